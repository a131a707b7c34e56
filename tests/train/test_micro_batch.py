"""train.memory_budget_gib splits the batch into micro-batches that fit, and the adapter equals
the one trained with the whole batch at once (gradient accumulation weighs every token alike)."""

import json

import torch
from safetensors.torch import load_file

from lorasft.cli import main
from lorasft.config import load_config
from lorasft.data.prepare import prepare
from lorasft.model.plan import activations
from lorasft.train.setup import prepare_model_and_tokenizer
from tests.train.test_distributed import args


def budget_for_micro_batch(model_dir, micro: int) -> float:
    """The GiB at which exactly `micro` records fit, from the same estimate the run uses."""
    cfg = load_config(None, args(model_dir, "/tmp/unused", 8)[1:])
    _, _, tok, model = prepare_model_and_tokenizer(cfg)
    longest = max(len(e) for e in prepare(cfg.data, tok).train)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = frozen * 4 + trainable * 16 + activations(model.config, longest, micro, 4, False)
    return (peak + 1) / 2**30


def test_budget_splits_the_batch_and_training_is_unchanged(tiny_llama_dir, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(args(tiny_llama_dir, whole, batch_size=8)) == 0
    budget = budget_for_micro_batch(tiny_llama_dir, 2)
    assert (
        main([*args(tiny_llama_dir, split, batch_size=8), f"train.memory_budget_gib={budget!r}"])
        == 0
    )
    assert "micro-batch 2 x 4 accumulation steps for a batch of 8" in capsys.readouterr().out
    r = json.loads((split / "results.json").read_text())["train"]
    assert (r["micro_batch"], r["grad_accum"], r["global_step"]) == (2, 4, 4)
    a = load_file(whole / "adapter_model.safetensors")
    b = load_file(split / "adapter_model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert any(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k)


def test_auto_budget_keeps_a_batch_that_fits(tiny_llama_dir, tmp_path):
    import psutil

    from lorasft.train.run import memory_budget_bytes

    budget = memory_budget_bytes()
    assert 0 < budget <= 0.9 * psutil.virtual_memory().total + psutil.Process().memory_info().rss
    run = tmp_path / "run"
    assert main([*args(tiny_llama_dir, run, batch_size=8), "train.memory_budget_gib=auto"]) == 0
    r = json.loads((run / "results.json").read_text())["train"]
    assert (r["micro_batch"], r["grad_accum"]) == (8, 1)  # a tiny model fits whole
