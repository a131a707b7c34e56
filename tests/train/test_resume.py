"""A run killed with SIGKILL and resumed with resume=auto ends with the same adapter."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from lorasft.cli import main
from lorasft.data.prepare import demo_files


def args(model_dir, run_dir):
    train, _ = demo_files()
    # LoRA dropout on, so the resumed run must also restore the RNG state to match.
    return ["train", f"model.path={model_dir}", f"data.train_file={train}", "data.val_ratio=0",
            "train.max_steps=24", "train.save_steps=2", "train.batch_size=2", "train.grad_accum=2",
            "train.save_total_limit=null", "train.early_stopping_patience=null",
            "train.eval_strategy=no", "lora.dropout=0.1", "train.learning_rate=1e-3",
            "eval.num_samples=0", "eval.compare_base=false", "lora.target_modules=[q_proj,v_proj]",
            f"output.run_dir={run_dir}"]  # fmt: skip


def kill_after_first_checkpoint(cmd: list[str], run_dir) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    marker = run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def test_kill_and_resume_matches_uninterrupted(tiny_llama_dir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(args(tiny_llama_dir, full)) == 0
    rc = kill_after_first_checkpoint(
        [sys.executable, "-m", "lorasft", *args(tiny_llama_dir, cut)], cut
    )
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (cut / "adapter_model.safetensors").exists()
    steps_done = sorted(int(p.name.split("-")[1]) for p in (cut / "checkpoints").iterdir())
    assert 4 <= steps_done[-1] < 24
    complete = [
        s
        for s in steps_done
        if (cut / "checkpoints" / f"checkpoint-{s}" / "trainer_state.json").exists()
    ]
    assert main([*args(tiny_llama_dir, cut), "resume=auto"]) == 0
    resumed = json.loads((cut / "results.json").read_text())["train"]["resumed_from"]
    assert resumed == str(cut / "checkpoints" / f"checkpoint-{complete[-1]}")
    a = load_file(full / "adapter_model.safetensors")
    b = load_file(cut / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 8  # q,v x A,B x 2 layers
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    # And it did train: the adapter moved away from its zero-initialised B.
    assert any(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k)
