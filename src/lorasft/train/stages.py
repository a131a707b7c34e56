"""Staged training: each stage trains the same LoRA model on its own data and settings, so it
starts from the weights the previous stage ended with. Each stage's adapter is also saved in
`<run>/stages/<n>-<name>/` and its resolved config beside it (by rank 0)."""

from __future__ import annotations

import json
from pathlib import Path

from lorasft.config import Config, ConfigError, dump_config
from lorasft.console import say
from lorasft.model.context import base_window
from lorasft.run_files import CONFIG, STAGE_DONE, write_json
from lorasft.train.checkpoints import complete_checkpoints
from lorasft.train.fit import TrainOutcome, fit
from lorasft.train.setup import set_checkpointing
from lorasft.train.trackers import parameters_logged


def stage_config(cfg: Config, i: int, window: int) -> Config:
    """Stage i's config; a stage longer than the window gets the long-stage defaults for the
    settings it does not give itself (batch 1, the batch made up by accumulation, checkpointing)."""
    stage = cfg.stage(i)
    if stage.data.max_length <= window:
        return stage
    own = cfg.stages[i].train
    defaults = {"batch_size": 1, "grad_accum": cfg.train.batch_size * cfg.train.grad_accum,
                "gradient_checkpointing": True}  # fmt: skip
    update = {k: v for k, v in defaults.items() if k not in own}
    return stage.model_copy(update={"train": stage.train.model_copy(update=update)})


def train_stages(cfg: Config, model, tok, run_dir: Path, precision: str, model_path: Path,
                 is_main: bool) -> TrainOutcome:  # fmt: skip
    """Train the stages in order. With train.resume, a stage that finished before (its
    stage_done.json) is skipped, and the first unfinished one continues from its newest complete
    checkpoint, or starts from the adapter the last finished stage saved."""
    window = base_window(model_path, cfg.model.trust_remote_code)
    resume = cfg.train.resume is not None
    history, summaries, out, finished = [], [], None, None
    for i, st in enumerate(cfg.stages):
        scfg = stage_config(cfg, i, window)
        name = f"{i + 1}-{st.name or 'stage'}"
        stage_dir = run_dir / "stages" / name
        if resume and (stage_dir / STAGE_DONE).is_file():
            done = read_stage_done(stage_dir)
            say(f"stage {name}: finished before, skipped")
            history, finished = _append(history, done["log_history"], name), stage_dir
            summaries.append({"stage": name, **done["info"]})
            continue
        ckpts = complete_checkpoints(stage_dir) if resume else []
        if not ckpts and finished is not None:  # a checkpoint restores the weights itself
            load_adapter_weights(model, finished)
        finished = None  # handed on: later stages start from this one's weights
        if is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            dump_config(scfg, stage_dir / CONFIG)
        t = scfg.train
        say(f"stage {name}: max_length {scfg.data.max_length}, batch {t.batch_size} x "
            f"accum {t.grad_accum}, checkpointing {t.gradient_checkpointing}"
            + (f", resuming {ckpts[-1]}" if ckpts else ""))  # fmt: skip
        set_checkpointing(model, t.gradient_checkpointing)
        with parameters_logged(first=out is None):  # the first stage trained in this process
            out = fit(scfg, model, tok, stage_dir, precision, str(ckpts[-1]) if ckpts else None)
        model = out.model
        if is_main:
            model.save_pretrained(stage_dir)
            record = {"log_history": out.log_history, "info": out.info}
            write_json(
                stage_dir / STAGE_DONE, record, indent=1
            )  # a stage is done or not, never half
        history = _append(history, out.log_history, name)
        summaries.append({"stage": name, **out.info})
    if out is None:  # every stage had finished: the run stopped before its evaluation
        out = finished_outcome(cfg, model, tok, run_dir, finished, window)
    out.run_dir, out.log_history = run_dir, history
    out.info = {**out.info, "stages": summaries}
    return out


def _append(history: list[dict], logs: list[dict], name: str) -> list[dict]:
    """One step axis across stages (each stage's Trainer counts from 0), for the loss curve and
    the overfitting verdict."""
    offset = history[-1]["step"] if history else 0
    return history + [{**h, "stage": name, "step": h.get("step", 0) + offset} for h in logs]


def read_stage_done(stage_dir: Path) -> dict:
    path = stage_dir / STAGE_DONE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); delete it to train that stage again") from e


def load_adapter_weights(model, stage_dir: Path) -> None:
    """The adapter (LoRA and modules_to_save) a finished stage saved, into the training model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    say(f"starting from the adapter of {stage_dir.name}")
    path = stage_dir / "adapter_model.safetensors"
    result = set_peft_model_state_dict(model, load_file(path))
    if result.unexpected_keys:
        raise ConfigError(f"{path}: tensors this run's adapter does not have, e.g. "
                          f"{result.unexpected_keys[0]}; was the config changed since that stage?")  # fmt: skip


def finished_outcome(
    cfg: Config, model, tok, run_dir: Path, last: Path, window: int
) -> TrainOutcome:
    from lorasft.data.prepare import prepare

    load_adapter_weights(model, last)
    data = prepare(stage_config(cfg, len(cfg.stages) - 1, window).data, tok)
    return TrainOutcome(run_dir, model, tok, data, [], {})
