"""torchrun with 2 CPU processes (gloo) gives the adapter of a 1-process run with the same global
batch, and only rank 0 evaluates and writes."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from lorasft.cli import main
from lorasft.data.prepare import demo_files


def args(model_dir, run_dir, batch_size):
    train, _ = demo_files()
    # No LoRA dropout and no length grouping: the only difference left is how the batch is split.
    return ["train", f"model.path={model_dir}", f"data.train_file={train}", "data.val_ratio=0",
            "train.max_steps=4", f"train.batch_size={batch_size}", "train.group_by_length=false",
            "train.eval_strategy=no", "train.early_stopping_patience=null", "lora.dropout=0",
            "lora.target_modules=[q_proj,v_proj]", "train.learning_rate=1e-2",
            "eval.num_samples=1", "eval.compare_base=false", "eval.max_new_tokens=4",
            f"output.run_dir={run_dir}"]  # fmt: skip


def test_two_processes_match_one_with_the_same_global_batch(tiny_llama_dir, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(args(tiny_llama_dir, single, batch_size=4)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29517", "-m", "lorasft", *args(tiny_llama_dir, ddp, batch_size=2)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[lorasft] run folder:") == 1  # rank 0 alone reports
    assert proc.stdout.count("base vs tuned") == 1  # and alone evaluates
    r = json.loads((ddp / "results.json").read_text())
    assert r["train"]["processes"] == 2 and r["train"]["global_step"] == 4
    a = load_file(single / "adapter_model.safetensors")
    b = load_file(ddp / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert any(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k)
