"""Evaluation by length: sliding-window perplexity, passkey retrieval, attention bands, plots."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lorasft.cli import main
from lorasft.data.passkey import FILLER, NEEDLE, build_prompt
from lorasft.eval.attention import attention_by_distance, default_bands
from lorasft.eval.long_data import read_documents, token_stream
from lorasft.eval.long_models import eager_attention
from lorasft.eval.passkey import first_integer, passkey_grid, prefill, shared_prefix
from lorasft.eval.sliding import same_tokens_perplexity, sliding_perplexity, tail_windows, windows
from lorasft.model.context import length_ladder
from lorasft.report.long_report import write_long_plots
from tests.conftest import PNG, tiny_args


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def test_windows_score_only_new_tokens():
    # 10 tokens, window 4, stride 2: the first window scores 3 tokens, every later one 2.
    assert windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    # stride == window: each window's first token has no context and is not scored.
    assert windows(8, 4, 4) == [(0, 4, 3), (4, 8, 3)]


def test_sliding_perplexity_equals_hand_computation(llama):
    ids = [7, 42, 99, 3, 250, 18, 77, 5, 301, 64]
    with torch.no_grad():
        logits = [
            llama(torch.tensor([ids[b:e]])).logits[0] for b, e in ((0, 4), (2, 6), (4, 8), (6, 10))
        ]

    def nll(window, begin, pos):  # token ids[pos] predicted inside the window starting at begin
        return F.cross_entropy(logits[window][pos - begin - 1], torch.tensor(ids[pos])).item()

    # window 0 scores tokens 1-3; windows 1, 2, 3 score only their two new tokens (4-5, 6-7, 8-9).
    terms = [nll(0, 0, 1), nll(0, 0, 2), nll(0, 0, 3), nll(1, 2, 4), nll(1, 2, 5),
             nll(2, 4, 6), nll(2, 4, 7), nll(3, 6, 8), nll(3, 6, 9)]  # fmt: skip
    got = sliding_perplexity(llama, ids, length=4, stride=2)
    assert got["tokens"] == 9 and got["windows"] == 4
    assert abs(got["loss"] - sum(terms) / 9) < 1e-4
    assert abs(got["perplexity"] - math.exp(sum(terms) / 9)) < 1e-2
    # max_windows=2 reads ids[:6]: tokens 1-5.
    assert sliding_perplexity(llama, ids, 4, 2, max_windows=2)["tokens"] == 5
    assert sliding_perplexity(llama, ids, 16, 8)["perplexity"] is None  # text shorter than a window


def test_same_tokens_are_scored_at_every_length(llama):
    """At ends 8 and 16 the last 2 tokens are predicted with 4 and with 8 tokens of context."""
    ids = [7, 42, 99, 3, 250, 18, 77, 5, 301, 64, 11, 23, 5, 8, 140, 9, 17]
    assert tail_windows(len(ids), 8, 4) == [8, 16]

    def nll(begin, end, pos):  # ids[pos] predicted inside the window ids[begin:end]
        with torch.no_grad():
            logits = llama(torch.tensor([ids[begin:end]])).logits[0]
        return F.cross_entropy(logits[pos - begin - 1], torch.tensor(ids[pos])).item()

    got = same_tokens_perplexity(llama, ids, [4, 8], scored=2, windows=4)
    for n in (4, 8):
        want = sum(nll(e - n, e, p) for e in (8, 16) for p in (e - 2, e - 1)) / 4
        assert got[str(n)]["tokens"] == 4 and abs(got[str(n)]["loss"] - want) < 1e-4
    assert got["4"]["loss"] != got["8"]["loss"]  # same tokens, different context
    assert same_tokens_perplexity(llama, ids[:7], [4, 8], 2, 4)["8"]["perplexity"] is None
    with pytest.raises(ValueError, match="scored=4"):
        same_tokens_perplexity(llama, ids, [4, 8], scored=4, windows=1)


def test_passkey_prompt_and_scoring(tiny_tokenizer):
    p = build_prompt(tiny_tokenizer, 1200, 0.25, 48213)
    needle = NEEDLE.format(key=48213)
    assert p.text.count(needle) == 1 and p.text.count("48213") == 2
    unit = len(tiny_tokenizer(" " + FILLER, add_special_tokens=False).input_ids)
    assert 1200 - 2 * unit < len(p.ids) <= 1200
    assert p.filler_total >= 8 and p.filler_before == round(0.25 * p.filler_total)
    before = p.text[: p.text.index(needle)].count(FILLER)
    after = p.text[p.text.index(needle) :].count(FILLER)
    assert (before, after) == (p.filler_before, p.filler_total - p.filler_before)
    assert p.text.endswith("What is the pass key? The pass key is")
    edge = build_prompt(tiny_tokenizer, 1200, 1.0, 11111)
    assert edge.text.index(NEEDLE.format(key=11111)) > edge.text.rindex(FILLER)
    assert first_integer(" 48213. Remember") == 48213
    assert first_integer("is 4821 3") == 4821
    assert first_integer("the key is -7") == 7
    assert first_integer("no digits here") is None


class KeyEcho:
    """Answers every prompt with the key it finds in it, as a model with perfect retrieval."""

    device = torch.device("cpu")

    def __init__(self, tok):
        self.tok = tok

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        key = re.search(r"pass key is (\d+)", self.tok.decode(input_ids[0])).group(1)
        new = self.tok(f" {key}. Done", add_special_tokens=False).input_ids[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def test_passkey_grid_perfect_and_random_models(tiny_tokenizer, llama):
    echo = {"lengths": [600, 900], "depths": [0.0, 0.5, 1.0], "trials": 3, "reuse_prefix": False}
    grid = passkey_grid(KeyEcho(tiny_tokenizer), tiny_tokenizer, **echo)
    assert grid["accuracy"] == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert len(grid["records"]) == 18 and len({r["key"] for r in grid["records"]}) > 1
    again = passkey_grid(KeyEcho(tiny_tokenizer), tiny_tokenizer, **echo)
    assert [r["key"] for r in again["records"]] == [r["key"] for r in grid["records"]]  # seeded
    # An untrained model does not write the key: 0% in every cell, same shape.
    dumb = passkey_grid(llama, tiny_tokenizer, [600], [0.0, 1.0], trials=1, max_new_tokens=4)
    assert dumb["accuracy"] == [[0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cells_shared_prefix_is_read_once_with_the_same_answers(tiny_tokenizer, llama, dtype):
    """The trials of a cell share the filler before the needle: its KV cache, reused, gives the
    next-token logits of the whole prompt (fp32 and bf16 alike: the same products, here equal
    to 1e-5 of logits of size ~0.3) and the grid's answers, key for key; the cache of other
    tokens (the control) is 0.04 off."""
    model = llama.to(dtype)
    try:
        prompts = [build_prompt(tiny_tokenizer, 600, 0.75, key) for key in (12345, 67890, 55555)]
        n = shared_prefix([p.ids for p in prompts])
        assert 300 < n < len(prompts[0].ids) and prompts[0].ids[:n] == prompts[2].ids[:n]
        ids, other = (
            prompts[1].ids,
            torch.randint(5, 250, (n,), generator=torch.Generator().manual_seed(0)),
        )
        with torch.no_grad():
            whole = model(torch.tensor([ids])).logits[0, -1].float()
            rest = torch.tensor([ids[n:]])
            cached = model(rest, cache=prefill(model, ids[:n])).logits[0, -1].float()
            wrong = model(rest, cache=prefill(model, other.tolist())).logits[0, -1].float()
        assert (cached - whole).abs().max() < 1e-5
        assert (wrong - whole).abs().max() > 0.01  # the comparison can fail
        kw = {"lengths": [600, 900], "depths": [0.25, 1.0], "trials": 3, "max_new_tokens": 4}
        reused = passkey_grid(model, tiny_tokenizer, **kw)
        assert (
            reused["records"]
            == passkey_grid(model, tiny_tokenizer, reuse_prefix=False, **kw)["records"]
        )
    finally:
        llama.to(torch.float32)


def test_shared_prefix_leaves_every_prompt_a_token():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9, 9]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix([[7, 1], [8, 1]]) == 0


def test_attention_bands_sum_to_one_per_layer(llama):
    ids = list(range(5, 205))
    with pytest.raises(ValueError, match="eager"):
        attention_by_distance(llama, ids)
    with eager_attention(llama):
        res = attention_by_distance(llama, ids, n_sink=4)
    assert llama.config._attn_implementation == "sdpa"  # switched back
    assert res["bands"] == [[0, 64], [64, 200]] and len(res["layers"]) == 2
    for row in res["layers"]:
        assert abs(sum(row["bands"]) - 1) < 1e-4 and row["queries"] == 100
        assert 0 < row["sink"] < 1 and all(b >= 0 for b in row["bands"])
    # Random weights spread attention roughly evenly: the long band (keys 64+ back) gets most.
    assert res["layers"][0]["bands"][1] > res["layers"][0]["bands"][0]
    assert default_bands(8192) == [(0, 64), (64, 256), (256, 1024), (1024, 4096), (4096, 8192)]


def test_lengths_and_long_data(tmp_path, tiny_tokenizer):
    assert length_ladder(8192, 16384) == [4096, 8192, 16384]
    assert length_ladder(64, 256) == [32, 64, 128, 256]
    docs = read_documents(None)
    assert len(docs) == 1 and len(docs[0].split()) > 3000
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "one two"}) + "\n" + json.dumps({"text": "three"}) + "\n")
    ids = token_stream(read_documents([f]), tiny_tokenizer)
    assert ids.count(tiny_tokenizer.eos_token_id) == 2  # one after each document
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: text: missing"):
        read_documents([bad])


# fp32 and bf16 forced: the rows are recomputed below on the reopened run in the dtype it trained
# in, the same computation, so the 1e-4 bound holds in both
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eval_long_after_training_and_from_cli(tiny_llama_dir, tmp_path, precision):
    run = tmp_path / "run"
    args = tiny_args(tiny_llama_dir, run, "eval.num_samples=0", "eval.compare_base=false",
                     "context.target_length=512", "context.method=linear",
                     "eval.passkey_trials=1", "eval.passkey_depths=[0.0,1.0]",
                     f"train.precision={precision}")  # fmt: skip
    assert main(args) == 0
    lc = json.loads((run / "results.json").read_text())["long_context"]
    assert lc["original_window"] == 256 and lc["lengths"] == [128, 256, 512] and lc["factor"] == 2.0
    assert set(lc["perplexity"]) == {"base", "base_scaled", "tuned"}
    # Each row scores the same final tokens (127 before each of 2 end points, the shipped text)
    # with 128, 256 and 512 tokens of context; recomputed here on the reopened run and its base.
    from lorasft.eval.long_data import token_stream
    from lorasft.eval.long_models import load_base_on
    from lorasft.model.reopen import frozen_dtype, open_run

    tuned = open_run(run)
    ids = token_stream(read_documents(None), tuned.tok)
    plain = load_base_on(tuned.cfg, frozen_dtype(tuned.model), scaled=False)
    for name, model in (("tuned", tuned.model), ("base", plain)):
        want = same_tokens_perplexity(model, ids, [128, 256, 512], 127, 2)
        for n in (128, 256, 512):
            assert abs(lc["perplexity"][name][str(n)]["loss"] - want[str(n)]["loss"]) < 1e-4, (
                name,
                n,
            )
            assert lc["perplexity"][name][str(n)]["tokens"] == 254
    assert lc["perplexity"]["tuned"]["256"]["loss"] != lc["perplexity"]["base"]["256"]["loss"]
    # linear scaling changes the base's outputs at every length
    assert lc["perplexity"]["base"]["512"] != lc["perplexity"]["base_scaled"]["512"]
    assert len(lc["passkey"]["accuracy"]) == 3 and len(lc["passkey"]["accuracy"][0]) == 2
    assert len(lc["passkey_base"]["accuracy"]) == 3  # the before: base + scaling, untrained
    # the report card, from the rows above: the control against the scaled base at 128 and 512,
    # the last doubling (512 / 256), the base's passkey inside its 256-token window
    ppl = {m: {n: lc["perplexity"][m][str(n)]["perplexity"] for n in (128, 256, 512)}
           for m in lc["perplexity"]}  # fmt: skip
    card = lc["card"]
    assert card["control"]["untrained"] == "base_scaled"
    assert card["control"]["ratio_short"] == round(ppl["tuned"][128] / ppl["base_scaled"][128], 4)
    assert card["control"]["ratio_long"] == round(ppl["tuned"][512] / ppl["base_scaled"][512], 4)
    assert card["doubling"]["tuned"] == round(ppl["tuned"][512] / ppl["tuned"][256], 4)
    assert card["doubling"]["base"] == round(ppl["base"][256] / ppl["base"][128], 4)
    assert card["retention"]["ratio"] == round(ppl["tuned"][128] / ppl["base"][128], 4)
    assert lc["passkey_base_window"]["lengths"] == [256]
    assert card["passkey"]["base_in_window"]["trials"] == 2  # 1 trial x 2 depths
    assert card["passkey"]["tuned"]["length"] == 512 and card["passkey"]["met"] is not None
    page = (run / "report.html").read_text()
    assert "<ul id=card>" in page and "(d) retention" in page
    for name in ("ppl_by_length.png", "passkey.png", "attention_by_distance.png"):
        assert (run / name).read_bytes()[:8] == PNG, name
    text = tmp_path / "long.txt"
    text.write_text(read_documents(None)[0][:6000], encoding="utf-8")
    for name in lc["plots"]:
        (run / name).unlink()
    # eval.passkey_before: false drops the untrained base's grid, never the card's reference
    saved = (run / "config.yaml").read_text()
    assert "passkey_before: true" in saved
    (run / "config.yaml").write_text(saved.replace("passkey_before: true", "passkey_before: false"))
    assert main(["eval", str(run), "--num-samples", "0", "--long", "--long-data", str(text),
                 "--lengths", "64", "128", "--passkey-lengths", "64", "256", "--trials", "1",
                 "--depths", "0.5", "--protocol", "sliding"]) == 0  # fmt: skip
    ev = json.loads((run / "eval_results.json").read_text())["long_context"]
    assert ev["lengths"] == [64, 128] and ev["passkey"]["accuracy"] == [[0.0], [0.0]]
    assert ev["passkey"]["lengths"] == [64, 256]
    assert ev["passkey_base"] is None and ev["passkey_base_window"]["lengths"] == [256]
    assert ev["perplexity"]["tuned"]["128"]["perplexity"] is not None
    assert (run / "passkey.png").read_bytes()[:8] == PNG


def test_plots_are_pngs(tmp_path):
    res = {"original_window": 64, "target_length": 256, "method": "linear", "lengths": [32, 64],
           "labels": {"base": "base", "tuned": "tuned"},
           "perplexity": {"base": {"32": {"perplexity": 9.0}, "64": {"perplexity": None}},
                          "tuned": {"32": {"perplexity": 8.0}, "64": {"perplexity": 7.5}}},
           "passkey": {"lengths": [32, 64], "depths": [0.0, 1.0], "trials": 1,
                       "accuracy": [[1.0, 0.0], [0.5, 1.0]]},
           "attention": {"length": 64, "first_query": 32, "n_sink": 4, "bands": [[0, 64]],
                         "layers": [{"bands": [1.0], "sink": 0.2}, {"bands": [1.0], "sink": 0.3}]}}  # fmt: skip
    names = write_long_plots(res, tmp_path)
    assert names == ["ppl_by_length.png", "passkey.png", "attention_by_distance.png"]
    for n in names:
        assert (tmp_path / n).read_bytes()[:8] == PNG
