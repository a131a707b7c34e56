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


def test_swap_leaves_protected_words_in_place():
    rng = random.Random(0)
    text = "My colleague Omar moved to Cairo last spring with his two cats."
    before = segment(text)
    for _ in range(20):
        after = segment(augment_text(text, "swap", 0.5, rng, protected="Omar Cairo"))
        assert after.index("Omar") == before.index("Omar")
        assert after.index("Cairo") == before.index("Cairo")
        assert sorted(after) == sorted(before)  # a permutation of the same words


def test_eval_data_is_never_augmented_and_copies_are_counted(tiny_tokenizer):
    from lorasft.config import load_config
    from lorasft.data.prepare import prepare

    plain = prepare(load_config(None, ["data.augment.ratio=0"]).data, tiny_tokenizer)
    aug = prepare(load_config(None, ["data.augment.ratio=2"]).data, tiny_tokenizer)
    assert [e.input_ids for e in aug.eval] == [e.input_ids for e in plain.eval]
    assert [e.messages for e in aug.eval_examples] == [e.messages for e in plain.eval_examples]
    added = aug.counts["augmented_added"]
    assert plain.counts["augmented_added"] == 0 and 0 < added <= 2 * len(plain.train)
    assert len(aug.train) == len(plain.train) + added


def test_neftune_noise_in_training_only(tiny_llama_dir, tmp_path):
    import torch
    from transformers import TrainerCallback

    from lorasft.config import load_config
    from lorasft.data.prepare import prepare
    from lorasft.train.fit import build_trainer
    from lorasft.train.setup import prepare_model_and_tokenizer
    from tests.conftest import QUICK, tiny_args

    argv = tiny_args(tiny_llama_dir, tmp_path / "run", *QUICK, "train.max_steps=1",
                     "data.augment.neftune_noise_alpha=5")[1:]  # fmt: skip
    cfg = load_config(None, argv)
    _, precision, tok, model = prepare_model_and_tokenizer(cfg)
    ids = torch.tensor([[5, 6, 7, 8]])
    seen = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            emb = model.get_input_embeddings()
            with torch.no_grad():
                model.train()
                seen["train"] = (emb(ids), emb(ids))
                model.eval()
                seen["eval"] = (emb(ids), emb(ids))
                model.train()

    trainer = build_trainer(cfg, model, tok, prepare(cfg.data, tok), tmp_path / "run", precision)
    trainer.add_callback(Probe())
    trainer.train()
    clean = model.get_input_embeddings()(ids)
    assert not torch.equal(*seen["train"])  # noisy: two draws differ
    assert torch.equal(seen["eval"][0], clean) and torch.equal(seen["eval"][1], clean)
