"""Staged training: each stage trains the same LoRA model on its own data and settings, so it
starts from the weights the previous stage ended with. Each stage's adapter is also saved in
`<run>/stages/<n>-<name>/` and its resolved config beside it (by rank 0)."""

from __future__ import annotations

from pathlib import Path

from lorasft.config import Config, dump_config
from lorasft.model.context import context_window
from lorasft.train.fit import TrainOutcome, fit
from lorasft.train.launch import say

LONG_STAGE_DEFAULTS = ("batch_size", "grad_accum", "gradient_checkpointing")


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


def set_checkpointing(model, on: bool) -> None:
    base = model.get_base_model()
    if on and not base.is_gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    elif not on and base.is_gradient_checkpointing:
        base.gradient_checkpointing_disable()


def base_window(model_path: Path, cfg: Config) -> int:
    """The window the base was trained with: read from its folder, since the loaded model's
    config already carries the context extension."""
    from transformers import AutoConfig

    trust = cfg.model.trust_remote_code
    return context_window(AutoConfig.from_pretrained(model_path, trust_remote_code=trust))


def train_stages(cfg: Config, model, tok, run_dir: Path, precision: str, model_path: Path,
                 is_main: bool) -> TrainOutcome:  # fmt: skip
    window = base_window(model_path, cfg)
    history, summaries, out = [], [], None
    for i, st in enumerate(cfg.stages):
        scfg = stage_config(cfg, i, window)
        name = f"{i + 1}-{st.name or 'stage'}"
        stage_dir = run_dir / "stages" / name
        if is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            dump_config(scfg, stage_dir / "config.yaml")
        t = scfg.train
        say(f"[lorasft] stage {name}: max_length {scfg.data.max_length}, batch {t.batch_size} x "
            f"accum {t.grad_accum}, checkpointing {t.gradient_checkpointing}")  # fmt: skip
        set_checkpointing(model, t.gradient_checkpointing)
        out = fit(scfg, model, tok, stage_dir, precision)
        model = out.model
        if is_main:
            model.save_pretrained(stage_dir)
        # One step axis across stages (each stage's Trainer counts from 0), for the loss curve
        # and the overfitting verdict.
        offset = history[-1]["step"] if history else 0
        history += [
            {**h, "stage": name, "step": h.get("step", 0) + offset} for h in out.log_history
        ]
        summaries.append({"stage": name, **out.info})
    out.run_dir, out.log_history = run_dir, history
    out.info = {**out.info, "stages": summaries}
    return out
