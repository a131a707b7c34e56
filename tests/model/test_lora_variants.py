"""lora.init (PEFT's init_lora_weights) and LoRA+ (train.loraplus_lr_ratio) through a run's life:
trained, resumed, reopened and merged, in fp32 and bf16. PiSSA and OLoRA move part of each
weight out of the base while training and are saved as a plain LoRA of rank 2r on the unchanged
base: the reopened and the merged run answer as the model did in training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorasft.cli import main
from lorasft.config import ConfigError, load_config
from lorasft.export.merge import merge_runs
from lorasft.model.reopen import open_run
from lorasft.train.pipeline import train
from tests.conftest import PRECISIONS, QUICK, logit_tolerance, tiny_args

IDS = torch.tensor([[5, 17, 42, 99, 7, 23, 64, 11, 3, 8]])


def run_args(model_dir, run_dir, precision: str, *extra: str) -> list[str]:
    return tiny_args(model_dir, run_dir, *QUICK, f"train.precision={precision}",
                     "train.lr_scheduler=constant", "train.warmup_ratio=0", "lora.dropout=0",
                     "train.save_steps=1", "train.save_total_limit=null", *extra)[1:]  # fmt: skip


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_moving_inits_reopen_and_merge_as_trained(tiny_llama_dir, tmp_path, init, precision):
    run = tmp_path / "run"
    out = train(load_config(None, run_args(tiny_llama_dir, run, precision, f"lora.init={init}")))
    out.model.eval()
    trained = logits(out.model)
    saved = json.loads((run / "adapter_config.json").read_text())
    assert saved["r"] == 16 and saved["lora_alpha"] == 32  # rank 2r, the scale alpha / r kept
    assert saved["init_lora_weights"] is True  # a plain LoRA: applied to the unchanged base
    reopened = open_run(run)
    got = logits(reopened.model)
    # fp32: the conversion only reorders sums. bf16: in training the base held W - BA_0 rounded
    # to bf16, the reopened run adds the fp32 delta to the original bf16 W; that one rounding of
    # the weights (u relative) sits inside logit_tolerance's 8u of activation roundings
    # (measured 1.75u for both inits; the adapter's own effect is over 10u).
    tol = logit_tolerance(precision, trained)
    diff = (got - trained).abs().max().item()
    with reopened.model.disable_adapter():
        effect = (logits(reopened.model) - trained).abs().max().item()
    assert diff < tol
    assert effect > 3 * diff  # the adapter's change to the logits, far beyond the difference
    _, merged = merge_runs([run])
    merged_logits = logits(merged.eval())
    assert (merged_logits - got.float()).abs().max().item() < logit_tolerance(precision, got)


def test_a_base_moving_run_reports_the_real_base(tiny_llama_dir, tmp_path):
    """The end-of-run evaluation's base is the unchanged base (the in-memory one lost what pissa
    moved into the adapter): the same base perplexity as a run with the default init."""
    scores = {}
    for init in ("default", "pissa"):
        run = tmp_path / init
        assert main(["train", *run_args(tiny_llama_dir, run, "fp32", f"lora.init={init}",
                                         "eval.compare_base=true", "eval.cache_base=false")]) == 0  # fmt: skip
        scores[init] = json.loads((run / "results.json").read_text())["eval"]
    assert scores["pissa"]["base"]["perplexity"] == scores["default"]["base"]["perplexity"]
    assert scores["pissa"]["tuned"]["perplexity"] != scores["pissa"]["base"]["perplexity"]


def test_base_moving_init_resumes_to_the_same_adapter(tiny_llama_dir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *run_args(tiny_llama_dir, full, "fp32", "lora.init=pissa")]) == 0
    assert main(["train", *run_args(tiny_llama_dir, cut, "fp32", "lora.init=pissa",
                                     "train.max_steps=2")]) == 0  # fmt: skip
    assert main(["train", *run_args(tiny_llama_dir, cut, "fp32", "lora.init=pissa",
                                     f"train.resume={cut}")]) == 0  # fmt: skip
    info = json.loads((cut / "results.json").read_text())["train"]
    assert info["resumed_from"] == str(cut / "checkpoints" / "checkpoint-2")
    a, b = (
        load_file(full / "adapter_model.safetensors"),
        load_file(cut / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("init", ["gaussian", "orthogonal"])
def test_other_inits_train_and_reopen(tiny_llama_dir, tmp_path, init):
    run = tmp_path / "run"
    out = train(load_config(None, run_args(tiny_llama_dir, run, "fp32", f"lora.init={init}")))
    out.model.eval()
    assert (logits(open_run(run).model) - logits(out.model)).abs().max().item() < 1e-4
    assert json.loads((run / "adapter_config.json").read_text())["init_lora_weights"] == init


@pytest.mark.parametrize("precision", PRECISIONS)
def test_loraplus_gives_b_its_own_learning_rate_and_resumes(tiny_llama_dir, tmp_path, precision):
    full, cut, plain = tmp_path / "full", tmp_path / "cut", tmp_path / "plain"
    out = train(load_config(None, run_args(tiny_llama_dir, full, precision,
                                           "train.loraplus_lr_ratio=16")))  # fmt: skip
    named = {id(p): n for n, p in out.model.named_parameters()}
    rates = {}
    for group in out.trainer.optimizer.param_groups:
        for p in group["params"]:
            rates[named[id(p)]] = group["lr"]
    lora_a = {r for n, r in rates.items() if "lora_A" in n}
    lora_b = {r for n, r in rates.items() if "lora_B" in n}
    assert lora_a == {1e-3} and lora_b == {16e-3}
    assert main(["train", *run_args(tiny_llama_dir, plain, precision)]) == 0
    a, p = (
        load_file(full / "adapter_model.safetensors"),
        load_file(plain / "adapter_model.safetensors"),
    )
    norm = lambda d: sum(v.norm() for k, v in d.items() if "lora_B" in k)
    assert norm(a) > 4 * norm(p)  # B moved with 16x the step
    assert main(["train", *run_args(tiny_llama_dir, cut, precision, "train.loraplus_lr_ratio=16",
                                     "train.max_steps=2")]) == 0  # fmt: skip
    assert main(["train", *run_args(tiny_llama_dir, cut, precision, "train.loraplus_lr_ratio=16",
                                     f"train.resume={cut}")]) == 0  # fmt: skip
    b = load_file(cut / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the optimizer's state came back whole


@pytest.mark.parametrize(
    ("yaml", "match"),
    [
        (
            "lora: {init: pissa}\nmodel: {quantization: nf4}",
            "lora.init=pissa with model.quantization",
        ),
        ("lora: {init: olora, use_dora: true}", "lora.init=olora with lora.use_dora"),
        ("lora: {init: pissa}\nstages: [{name: a, train: {max_steps: 1}}]", "pissa with stages"),
        ("lora: {init: pissa}\ntrain: {deepspeed: ds.json}", "pissa with train.deepspeed"),
        ("train: {loraplus_lr_ratio: 16, optimizer: sgd}", "train.optimizer=adamw"),
        ("lora: {init: loftq}", "lora.init"),
        ("lora: {init: orthogonal, r: 5}", "needs an even lora.r"),
    ],
)
def test_unsupported_combinations_are_config_errors(tmp_path, yaml, match):
    (tmp_path / "c.yaml").write_text(yaml + "\n")
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "c.yaml")
