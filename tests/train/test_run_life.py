"""What a run leaves behind, and who writes it: TensorBoard folders per run, stage folders by
rank 0 only, no DeepSpeed chatter on runs that do not use it."""

import json
import subprocess
import sys

import pytest

from lorasft.cli import main
from lorasft.config import StageSection, load_config
from lorasft.train.setup import prepare_model_and_tokenizer
from lorasft.train.stages import train_stages
from tests.conftest import QUICK, tiny_args


def _events(folder):
    return sorted(p.name for p in folder.rglob("events.out.tfevents.*"))


def _scalars(folder) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_each_run_in_one_process_logs_to_its_own_tensorboard_folder(tiny_llama_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert main(tiny_args(tiny_llama_dir, run, *QUICK, "train.max_steps=2")) == 0
    for run in (a, b):
        # the training's events, then the final metrics' (logged after training ended)
        assert 1 <= len(_events(run / "tensorboard")) <= 2
        logged = _scalars(run / "tensorboard")
        history = json.loads((run / "results.json").read_text())["log_history"]
        assert logged["train/loss"] == pytest.approx([h["loss"] for h in history if "loss" in h])
        final = json.loads((run / "results.json").read_text())["eval"]["tuned"]["perplexity"]
        assert logged["train/final/tuned/perplexity"] == pytest.approx([final["perplexity"]])


def test_only_the_main_rank_writes_stage_folders(tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, tiny_args(tiny_llama_dir, run, *QUICK)[1:])
    cfg = cfg.model_copy(update={"stages": [StageSection(name="one", train={"max_steps": 1})]})
    path, precision, tok, model = prepare_model_and_tokenizer(cfg)
    stage = run / "stages" / "1-one"
    written = ("config.yaml", "adapter_model.safetensors")
    train_stages(cfg, model, tok, run, precision, path, is_main=False)
    assert not any((stage / name).exists() for name in written)  # (Trainer's own logs aside)
    train_stages(cfg, model, tok, run, precision, path, is_main=True)
    assert all((stage / name).is_file() for name in written)


def test_a_run_without_deepspeed_says_nothing_about_it(tiny_llama_dir, tmp_path):
    argv = tiny_args(tiny_llama_dir, tmp_path / "run", *QUICK, "train.max_steps=1")
    proc = subprocess.run([sys.executable, "-m", "lorasft", *argv], capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[lorasft] run folder:" in proc.stderr
    assert "accelerator" not in (proc.stdout + proc.stderr).lower()
