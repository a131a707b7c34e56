"""train.memory_budget_gib splits the batch into micro-batches that fit, and the adapter equals
the one trained with the whole batch at once (gradient accumulation weighs every token alike)."""

import json

import pytest
from safetensors.torch import load_file

from lorasft.cli import main
from lorasft.config import load_config
from lorasft.data.prepare import prepare
from lorasft.model.plan import activations
from lorasft.train.setup import prepare_model_and_tokenizer
from tests.conftest import PRECISIONS, adapter_difference, adapter_tolerance
from tests.train.test_distributed import args


def budget_for_micro_batch(model_dir, micro: int, precision: str) -> float:
    """The GiB at which exactly `micro` records fit, from the same estimate the run uses."""
    cfg = load_config(None, args(model_dir, "/tmp/unused", 8, precision)[1:])
    _, _, tok, model = prepare_model_and_tokenizer(cfg)
    longest = max(len(e) for e in prepare(cfg.data, tok).train)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    p = 4 if precision == "fp32" else 2
    chunk = cfg.train.loss_chunk_tokens
    peak = frozen * p + trainable * 16 + activations(model.config, longest, micro, p, False,
                                                     "sdpa", chunk)  # fmt: skip
    return (peak + 1) / 2**30


@pytest.mark.parametrize("precision", PRECISIONS)
def test_budget_splits_the_batch_and_training_is_unchanged(
    precision, tiny_llama_dir, tmp_path, capsys
):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(args(tiny_llama_dir, whole, 8, precision)) == 0
    budget = budget_for_micro_batch(tiny_llama_dir, 2, precision)
    budget_arg = f"train.memory_budget_gib={budget!r}"
    assert main([*args(tiny_llama_dir, split, 8, precision), budget_arg]) == 0
    assert "micro-batch 2 x 4 accumulation steps for a batch of 8" in capsys.readouterr().err
    r = json.loads((split / "results.json").read_text())["train"]
    assert (r["micro_batch"], r["grad_accum"], r["global_step"]) == (2, 4, 4)
    a = load_file(whole / "adapter_model.safetensors")
    b = load_file(split / "adapter_model.safetensors")
    assert adapter_difference(a, b) < adapter_tolerance(precision)
    assert any(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k)


def test_auto_budget_keeps_a_batch_that_fits(tiny_llama_dir, tmp_path):
    import psutil

    from lorasft.train.fit import memory_budget_bytes

    budget = memory_budget_bytes()
    assert 0 < budget <= 0.9 * psutil.virtual_memory().total + psutil.Process().memory_info().rss
    run = tmp_path / "run"
    assert main([*args(tiny_llama_dir, run, batch_size=8), "train.memory_budget_gib=auto"]) == 0
    r = json.loads((run / "results.json").read_text())["train"]
    assert (r["micro_batch"], r["grad_accum"]) == (8, 1)  # a tiny model fits whole
