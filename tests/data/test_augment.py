import random

from lorasft.data.augment import augment_examples, augment_text, segment
from lorasft.data.formats import Example


def test_chinese_is_segmented_into_words_not_one_chunk():
    words = [w for w in segment("王强去年搬到了广州。") if w.strip()]
    assert len(words) >= 4 and "".join(words) == "王强去年搬到了广州。"
    assert ["王强去年搬到了广州。"] == ["王强去年搬到了广州。"]  # what whitespace splitting gives


def test_words_in_the_response_are_never_touched():
    rng = random.Random(0)
    for _ in range(30):
        out = augment_text(
            "我的同事陈静在成都开了一家咖啡店",
            "delete",
            0.5,
            rng,
            protected='{"name": "陈静", "city": "成都"}',
        )
        assert "陈静" in out and "成都" in out
        out = augment_text(
            "My colleague Omar moved to Cairo last spring.",
            "swap",
            0.5,
            rng,
            protected="Omar Cairo",
        )
        assert "Omar" in out and "Cairo" in out


def test_augmented_copies_change_the_prompt_never_the_response():
    ex = Example(
        "f:1",
        [
            {
                "role": "user",
                "content": "Find it\n\nBorn in Tokyo, Kenji now teaches maths there.",
                "instruction": "Find it",
                "input": "Born in Tokyo, Kenji now teaches maths there.",
            },
            {"role": "assistant", "content": '{"name": "Kenji", "city": "Tokyo"}'},
        ],
    )
    copies = augment_examples([ex], ratio=4, methods=["swap", "delete"], prob=0.3, seed=1)
    assert 1 <= len(copies) <= 4
    for c in copies:
        assert c.messages[1] == ex.messages[1]
        assert c.messages[0]["content"] != ex.messages[0]["content"]
        assert (
            c.messages[0]["content"]
            == f"{c.messages[0]['instruction']}\n\n{c.messages[0]['input']}"
        )
        assert "augmented" in c.source
    assert (
        ex.messages[0]["input"] == "Born in Tokyo, Kenji now teaches maths there."
    )  # original intact
    # Deterministic for a seed.
    again = augment_examples([ex], ratio=4, methods=["swap", "delete"], prob=0.3, seed=1)
    assert [c.messages for c in again] == [c.messages for c in copies]


def test_text_records_are_not_augmented():
    assert augment_examples([Example("t:1", text="a b c d e")], 2, ["swap"], 0.5, 0) == []
