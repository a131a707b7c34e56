"""2 CPU processes (gloo), launched by torchrun or accelerate, with DDP or DeepSpeed ZeRO-2/ZeRO-3,
give the adapter of a 1-process run with the same global batch, and only rank 0 evaluates and
writes (under ZeRO-3 each rank holds a shard, so rank 0 evaluates the saved adapter)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasft.cli import main
from lorasft.data.prepare import demo_files
from tests.conftest import PRECISIONS, adapter_difference, adapter_tolerance, precision_of

ROOT = Path(__file__).resolve().parents[2]


def args(model_dir, run_dir, batch_size, precision="fp32"):
    train, _ = demo_files()
    # No LoRA dropout and no length grouping: the only difference left is how the batch is split.
    return ["train", f"model.path={model_dir}", f"data.train_file={train}", "data.val_ratio=0",
            "train.max_steps=4", f"train.batch_size={batch_size}", "train.group_by_length=false",
            "train.eval_strategy=no", "train.early_stopping_patience=null", "lora.dropout=0", "data.augment.neftune_noise_alpha=null",
            "lora.target_modules=[q_proj,v_proj]", "train.learning_rate=1e-2",
            "eval.num_samples=1", "eval.compare_base=false", "eval.max_new_tokens=4",
            f"train.precision={precision}", f"output.run_dir={run_dir}"]  # fmt: skip


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]  # fmt: skip
DEEPSPEED = f"train.deepspeed={ROOT / 'examples' / 'deepspeed_zero2.json'}"
ZERO3 = f"train.deepspeed={ROOT / 'examples' / 'deepspeed_zero3.json'}"  # parameters sharded
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
EXIT_ABORT = "terminate called without an active exception"

LAUNCHES = {
    "torchrun-ddp": (TORCHRUN + ["--master-port", "29517"], [], "MULTI_CPU"),
    # with an automatic memory budget: rank 0 measures it and the ranks agree on the micro-batch
    "accelerate-ddp": (
        ACCELERATE + ["--main_process_port", "29518"],
        ["train.memory_budget_gib=auto"],
        "MULTI_CPU",
    ),
    "torchrun-deepspeed": (TORCHRUN + ["--master-port", "29519"], [DEEPSPEED], "DEEPSPEED"),
    "torchrun-deepspeed-zero3": (TORCHRUN + ["--master-port", "29521"], [ZERO3], "DEEPSPEED"),
}


@pytest.fixture(scope="module", params=PRECISIONS)
def single(request, tiny_llama_dir, tmp_path_factory):
    """The 1-process reference, in each precision."""
    run = tmp_path_factory.mktemp(f"single-{request.param}")
    assert main(args(tiny_llama_dir, run, batch_size=4, precision=request.param)) == 0
    return run


@pytest.mark.parametrize("launch", LAUNCHES)
def test_two_processes_match_one_with_the_same_global_batch(
    launch, single, tiny_llama_dir, tmp_path
):
    precision = precision_of(single)
    launcher, extra, distributed = LAUNCHES[launch]
    if "deepspeed" in launch and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "lorasft", *args(tiny_llama_dir, ddp, 2, precision), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode and EXIT_ABORT in proc.stderr and "zero3" in " ".join(cmd):
        # Known, rare (2 of about 12 full suites here): a ZeRO-3 rank that has finished aborts
        # in a C++ destructor as the interpreter exits, and torchrun then stops rank 0 before it
        # writes results. One rerun, for that signature only; every check below still applies.
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=600, check=False
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("[lorasft] run folder:") == 1  # rank 0 alone reports
    assert proc.stdout.count("base vs tuned") == 1  # and alone evaluates
    r = json.loads((ddp / "results.json").read_text())
    assert r["train"]["processes"] == 2 and r["train"]["global_step"] == 4
    assert r["train"]["distributed"] == distributed
    assert precision_of(ddp) == precision
    a = load_file(single / "adapter_model.safetensors")
    b = load_file(ddp / "adapter_model.safetensors")
    assert adapter_difference(a, b) < adapter_tolerance(precision)
    assert any(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k)
    # The evaluation used the trained weights (a shard or the untrained base would differ).
    single_eval = json.loads((single / "results.json").read_text())["eval"]
    loss, want = (
        r["eval"]["tuned"]["perplexity"]["loss"],
        single_eval["tuned"]["perplexity"]["loss"],
    )
    assert abs(loss - want) < (1e-4 if precision == "fp32" else adapter_tolerance(precision) * want)


def test_fsdp_on_cpu_says_it_is_not_in_effect(tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    cfg = [*args(tiny_llama_dir, run, batch_size=2), "train.fsdp=full_shard auto_wrap",
           "train.max_steps=1"]  # fmt: skip
    assert main(cfg) == 2  # one process: a config error naming the launch it needs
    cmd = [*TORCHRUN, "--master-port", "29520", "-m", "lorasft", *cfg]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if torch.cuda.is_available():
        return
    assert proc.stderr.count("train.fsdp is not in effect: accelerate runs FSDP on GPUs only") == 1
    assert json.loads((run / "results.json").read_text())["train"]["distributed"] == "MULTI_CPU"
