"""A run killed with SIGKILL and resumed with resume=auto ends with the same adapter."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorasft.cli import main
from lorasft.data.prepare import demo_files
from tests.conftest import PRECISIONS


def args(model_dir, run_dir, precision="fp32"):
    train, _ = demo_files()
    # LoRA dropout on, so the resumed run must also restore the RNG state to match.
    return ["train", f"model.path={model_dir}", f"data.train_file={train}", "data.val_ratio=0",
            "train.max_steps=24", "train.save_steps=2", "train.batch_size=2", "train.grad_accum=2",
            "train.save_total_limit=null", "train.early_stopping_patience=null",
            "train.eval_strategy=no", "lora.dropout=0.1", "train.learning_rate=1e-3",
            "eval.num_samples=0", "eval.compare_base=false", "lora.target_modules=[q_proj,v_proj]",
            f"train.precision={precision}", f"output.run_dir={run_dir}"]  # fmt: skip


def kill_after_first_checkpoint(cmd: list[str], run_dir) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    marker = run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_kill_and_resume_matches_uninterrupted(precision, tiny_llama_dir, tmp_path):
    """Bit for bit in either precision: the resumed run repeats the same computations in the
    same order from the saved weights, optimizer and RNG states; bf16 rounds them alike."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(args(tiny_llama_dir, full, precision)) == 0
    rc = kill_after_first_checkpoint(
        [sys.executable, "-m", "lorasft", *args(tiny_llama_dir, cut, precision)], cut
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
    assert main([*args(tiny_llama_dir, cut, precision), "resume=auto"]) == 0
    resumed = json.loads((cut / "results.json").read_text())["train"]["resumed_from"]
    assert resumed == str(cut / "checkpoints" / f"checkpoint-{complete[-1]}")
    a = load_file(full / "adapter_model.safetensors")
    b = load_file(cut / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 8  # q,v x A,B x 2 layers
    assert all(torch.equal(a[k], b[k]) for k in a)
    # And it did train: the adapter moved away from its zero-initialised B.
    assert any(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k)


def test_resume_auto_finds_this_run_name_only(tmp_path):
    """`demo` must not continue `demo-long`, whose folder sorts after it."""
    from lorasft.config import OutputSection
    from lorasft.train.checkpoints import find_resume, runs_of

    for name, step in (("demo-20261128-100000", 2), ("demo-long-20261128-110000", 4),
                       ("demo-notes", 6)):  # fmt: skip
        ckpt = tmp_path / name / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
    out = OutputSection(dir=str(tmp_path), name="demo")
    assert [p.name for p in runs_of(out)] == ["demo-20261128-100000"]
    run, ckpt = find_resume("auto", out)
    assert run.name == "demo-20261128-100000" and ckpt.endswith("checkpoint-2")
    long_run, _ = find_resume("auto", OutputSection(dir=str(tmp_path), name="demo-long"))
    assert long_run.name == "demo-long-20261128-110000"
