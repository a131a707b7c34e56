from lorasft.data.collate import PadCollator


def test_pads_to_the_longest_in_the_batch_not_max_length():
    batch = PadCollator(pad_token_id=9)([
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4], "labels": [4]},
    ])  # fmt: skip
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = PadCollator(pad_token_id=9, padding_side="left")(
        [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}]
    )
    assert left["input_ids"].tolist() == [[1, 2], [9, 3]] and left["attention_mask"].tolist() == [
        [1, 1],
        [0, 1],
    ]
