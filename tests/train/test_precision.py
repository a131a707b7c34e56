"""A frozen bf16 base with fp32 LoRA (the bf16 mode) trains to the loss fp32 reaches."""

import json

import torch
from safetensors.torch import load_file

from lorasft.cli import main
from lorasft.config import load_config
from lorasft.train.pipeline import train
from tests.conftest import tiny_args

QUICK = ["eval.num_samples=0", "eval.compare_base=false", "train.eval_strategy=no",
         "train.early_stopping_patience=null", "train.max_steps=20", "lora.dropout=0", "data.augment.neftune_noise_alpha=null",
         "train.learning_rate=2e-2", "lora.target_modules=all-linear"]  # fmt: skip


def final_loss(run) -> float:
    logs = json.loads((run / "results.json").read_text())["log_history"]
    return [h["loss"] for h in logs if "loss" in h][-1]


def test_bf16_base_reaches_the_fp32_loss(tiny_llama_dir, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert main(tiny_args(tiny_llama_dir, fp32, *QUICK, "train.precision=fp32")) == 0
    # Forced, so it runs in bf16 on a CPU without native bf16 too (emulated there).
    out = train(
        load_config(None, tiny_args(tiny_llama_dir, bf16, *QUICK, "train.precision=bf16")[1:])
    )
    # The model that trained: its frozen base in bf16, every trainable (LoRA) weight in fp32.
    frozen = {p.dtype for p in out.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in out.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert {t.dtype for t in load_file(bf16 / "adapter_model.safetensors").values()} == {
        torch.float32
    }
    assert json.loads((bf16 / "lorasft_run.json").read_text())["base_dtype"] == "bfloat16"
    first = json.loads((fp32 / "results.json").read_text())["log_history"][0]["loss"]
    a, b = final_loss(fp32), final_loss(bf16)
    assert a < first - 0.2  # it trained
    assert abs(a - b) < 0.05 * a, (a, b)
