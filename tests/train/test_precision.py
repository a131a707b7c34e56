"""A frozen bf16 base with fp32 LoRA (the bf16 mode) trains to the loss fp32 reaches."""

import json

from lorasft.cli import main
from tests.train.test_train_e2e import tiny_args

QUICK = ["eval.num_samples=0", "eval.compare_base=false", "train.eval_strategy=no",
         "train.early_stopping_patience=null", "train.max_steps=20", "lora.dropout=0",
         "train.learning_rate=2e-2", "lora.target_modules=all-linear"]  # fmt: skip


def final_loss(run) -> float:
    logs = json.loads((run / "results.json").read_text())["log_history"]
    return [h["loss"] for h in logs if "loss" in h][-1]


def test_bf16_base_reaches_the_fp32_loss(tiny_llama_dir, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert main(tiny_args(tiny_llama_dir, fp32, *QUICK)) == 0
    # model.dtype forces the frozen base into bf16 even on a CPU without native bf16.
    assert main(tiny_args(tiny_llama_dir, bf16, *QUICK, "model.dtype=bfloat16")) == 0
    first = json.loads((fp32 / "results.json").read_text())["log_history"][0]["loss"]
    a, b = final_loss(fp32), final_loss(bf16)
    assert a < first - 0.2  # it trained
    assert abs(a - b) < 0.05 * a, (a, b)
