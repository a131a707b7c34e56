"""The base's side of an evaluation is computed once per base and inputs, then reused: equal
numbers and answers, in fp32 and bf16; anything that changes the inputs computes it again."""

from __future__ import annotations

import json

import pytest

import lorasft.eval.evaluate as eval_run
from lorasft.cli import main
from tests.conftest import PRECISIONS, QUICK, tiny_args


@pytest.fixture(scope="module", params=PRECISIONS)
def run(request, tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"cache-{request.param}") / "run"
    args = tiny_args(tiny_llama_dir, out, *QUICK, "eval.compare_base=true",
                     f"train.precision={request.param}")  # fmt: skip
    assert main(args) == 0
    return out


def _eval(run, monkeypatch, cache, n: int = 4) -> tuple[dict, int]:
    calls = []
    real = eval_run.generate

    def counted(*args, **kw):
        calls.append(kw.get("base", False))
        return real(*args, **kw)

    monkeypatch.setattr(eval_run, "generate", counted)
    monkeypatch.setenv("LORASFT_CACHE", str(cache))
    assert main(["eval", str(run), "--num-samples", str(n)]) == 0
    return json.loads((run / "eval_results.json").read_text()), sum(calls)


def test_the_base_is_evaluated_once_per_inputs(run, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first, base_runs = _eval(run, monkeypatch, cache)
    assert first["base_from_cache"] is False and base_runs == 1
    again, base_runs = _eval(run, monkeypatch, cache)
    assert again["base_from_cache"] is True and base_runs == 0  # no base generation at all
    assert again["base"] == first["base"]  # perplexity and metrics, to the last digit
    assert [s["base"] for s in again["samples"]] == [s["base"] for s in first["samples"]]
    assert [s["tuned"] for s in again["samples"]] == [s["tuned"] for s in first["samples"]]
    other, base_runs = _eval(run, monkeypatch, cache, n=3)  # other inputs: computed again
    assert other["base_from_cache"] is False and base_runs == 1
