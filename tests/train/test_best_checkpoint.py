"""load_best_model_at_end keeps the best evaluation's adapter, and early stopping stops after
`patience` evaluations without improvement."""

import json

import torch
from safetensors.torch import load_file

from lorasft.cli import main
from tests.conftest import tiny_args


def test_the_saved_adapter_is_the_best_checkpoint(tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    # A learning rate this high makes the eval loss rise after the first evaluation.
    assert main(tiny_args(tiny_llama_dir, run, "train.max_steps=30", "train.eval_steps=2",
                          "train.learning_rate=1e-1", "train.early_stopping_patience=2",
                          "train.save_total_limit=null", "lora.target_modules=all-linear",
                          "eval.num_samples=0", "eval.compare_base=false",
                          "train.precision=fp32")) == 0  # fmt: skip
    r = json.loads((run / "results.json").read_text())
    evals = [(h["step"], h["eval_loss"]) for h in r["log_history"] if "eval_loss" in h]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert r["train"]["best_step"] == best_step == 2
    # Stopped after 2 evaluations that did not improve on the best: at step 2 + 2 x 2.
    assert r["train"]["global_step"] == best_step + 2 * 2 == evals[-1][0]
    saved = load_file(run / "adapter_model.safetensors")
    best = load_file(run / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    last = load_file(run / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], best[k]) for k in saved)
    assert not all(torch.equal(saved[k], last[k]) for k in saved)
    # And the final evaluation is the best checkpoint's.
    assert abs(r["eval"]["tuned"]["perplexity"]["loss"] - best_loss) < 1e-3
