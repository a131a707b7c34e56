"""`open_run`: a run reopens as it trained (dtype, attention, context window, system prompt), and
the server and the CLI answer through it."""

import json

import pytest
import torch
import yaml

from lorasft.cli import main
from lorasft.data.templates import with_system
from lorasft.data.tokenize import prompt_ids
from lorasft.model.precision import PRECISION_DTYPES
from lorasft.model.reopen import frozen_dtype, open_run
from lorasft.serve.engine import Params, load_engine
from tests.conftest import PRECISIONS, QUICK, precision_of, tiny_args


@pytest.fixture(scope="module", params=PRECISIONS)
def run(request, tiny_llama_dir, tmp_path_factory):
    """A run with a system prompt and three generated eval samples, in each precision."""
    d = tmp_path_factory.mktemp(f"run-{request.param}") / "run"
    assert main(tiny_args(tiny_llama_dir, d, "eval.compare_base=false", "train.eval_strategy=no",
                          "train.early_stopping_patience=null", "train.learning_rate=2e-2",
                          "data.system_prompt=Answer briefly.", "eval.max_new_tokens=10",
                          f"train.precision={request.param}")) == 0  # fmt: skip
    return d


def test_a_run_reopens_in_the_dtype_it_trained_in(run, capsys):
    assert frozen_dtype(open_run(run).model) == PRECISION_DTYPES[precision_of(run)]
    other = "float32" if precision_of(run) == "bf16" else "bfloat16"
    capsys.readouterr()
    assert frozen_dtype(open_run(run, other).model) == getattr(torch, other)
    assert f"in {other} (--dtype); it trained in" in capsys.readouterr().err


def test_a_run_from_before_run_info_uses_results_json(run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "lorasft_run.json").unlink()
    assert frozen_dtype(open_run(old).model) == PRECISION_DTYPES[precision_of(run)]


def test_the_server_answers_as_the_run_did_in_training(run):
    """Served greedy answers equal the in-training eval answers, system prompt included."""
    samples = json.loads((run / "results.json").read_text())["eval"]["samples"]
    engine = load_engine(None, [("t", str(run))])
    served = engine.served["t"]
    assert frozen_dtype(engine.model) == PRECISION_DTYPES[precision_of(run)]
    for s in samples:
        user = [{"role": "user", "content": s["prompt"]}]
        ids = engine.encode_chat(served, user)
        with_prompt = with_system(user, "Answer briefly.")
        assert ids == prompt_ids(with_prompt, served.tok) != prompt_ids(user, served.tok)
        job = engine.submit(served, ids, Params(max_tokens=10, temperature=0.0))
        assert job.text().strip() == s["tuned"]


def test_generate_adds_the_runs_system_prompt(run, capsys):
    sample = json.loads((run / "results.json").read_text())["eval"]["samples"][0]
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", sample["prompt"], "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() == sample["tuned"]


def test_flash_attention_run_opens_with_sdpa_here(run, tmp_path, capsys):
    import shutil

    if torch.cuda.is_available():
        pytest.skip("this machine could run flash attention")
    moved = tmp_path / "flash"
    shutil.copytree(run, moved)
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["model"]["attn_implementation"] = "flash_attention_2"
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    opened = open_run(moved)
    assert "the run used flash_attention_2, which cannot run here; opening it with sdpa" in (
        capsys.readouterr().err
    )
    assert opened.model.get_base_model().config._attn_implementation == "sdpa"


@pytest.mark.parametrize("method", ["dynamic", "yarn", "linear"])
def test_the_served_window_is_the_runs(method, tiny_llama_dir, tmp_path):
    run = tmp_path / method
    ctx = ["context.target_length=512", f"context.method={method}"]
    assert main(tiny_args(tiny_llama_dir, run, *QUICK, "train.max_steps=1", *ctx)) == 0
    assert open_run(run).window == 512  # the base's window is 256
    assert load_engine(None, [("x", str(run))]).context_window == 512
