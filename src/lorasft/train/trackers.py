"""Experiment trackers (`train.report_to`): the Trainer's own integrations (transformers'
callbacks), with lorasft's defaults around them, and lorasft's final metrics (generation
metrics, perplexity, the long-context report card) logged to the same runs after evaluation.

- tensorboard: events in `RUN/tensorboard` (stages: `RUN/stages/NAME/tensorboard`);
- mlflow: one MLflow run per lorasft run, named as its folder, in the experiment
  `MLFLOW_EXPERIMENT_NAME` or `output.name`, at `MLFLOW_TRACKING_URI` (MLflow's default unset);
- wandb: offline unless `WANDB_MODE` says otherwise, its files in the run folder unless
  `WANDB_DIR` is set;
- trackio, swanlab: their own defaults (both keep runs on this machine unless configured).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers.integrations import is_tensorboard_available


def report_to(names: list[str] | None) -> list[str]:
    """The Trainer's `report_to`: the configured trackers, or (None) TensorBoard when installed."""
    if names is None:
        return ["tensorboard"] if is_tensorboard_available() else []
    return list(names)


@contextmanager
def _env_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set variables the user has not set, for the duration; restore after."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextmanager
def tracking(names: list[str], run_dir: Path, experiment: str, main: bool) -> Iterator[None]:
    """Around the whole run (every stage, then the evaluation): the trackers' defaults, and on
    the main process one MLflow run that the Trainer's callback logs into and does not end, so
    the final metrics land in the same run."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(run_dir)} if "wandb" in names else {}
    with _env_defaults(env):
        if "mlflow" not in names or not main:
            yield
            return
        import mlflow

        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment)
        with mlflow.start_run(run_name=run_dir.name):
            yield


@contextmanager
def parameters_logged(first: bool) -> Iterator[None]:
    """Each stage's Trainer logs its arguments to the tracker; MLflow refuses a parameter logged
    again with another value (every stage has its own output folder and steps) in the one run of
    a staged run, so only the first stage trained in this process logs them."""
    with _env_defaults({} if first else {"MLFLOW_MAX_LOG_PARAMS": "0"}):
        yield


def final_metrics(results: dict[str, Any]) -> dict[str, float]:
    """lorasft's own figures, flat: `final/tuned/perplexity`, `final/tuned/exact_match`, ... (the
    evaluation's perplexity and generation metrics), the base's beside them, and the long-context card's ratios and rates (`final/long/...`)."""
    out: dict[str, float] = {}
    ev = results.get("eval", {})
    for who in ("tuned", "base"):
        for part in ("perplexity", "generation"):
            _flat(ev.get(who, {}).get(part), f"final/{who}", out)
    _flat(results.get("long_context", {}).get("card"), "final/long", out)
    return out


def _flat(value: Any, prefix: str, out: dict[str, float], depth: int = 3) -> None:
    if isinstance(value, dict) and depth:
        for k, v in value.items():
            _flat(v, f"{prefix}/{k}", out, depth - 1)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        out[prefix] = float(value)


def log_final(trainer, results: dict[str, Any]) -> dict[str, float]:
    """The final metrics through the Trainer's callbacks (every tracker of report_to), at the
    last step; returns what was logged."""
    metrics = final_metrics(results)
    if trainer is not None and metrics and trainer.args.report_to:
        trainer.log(metrics)
        for callback in trainer.callback_handler.callbacks:  # TensorBoard reopened its writer
            if getattr(callback, "tb_writer", None) is not None:
                callback.tb_writer.close()  # written out now, not at some later flush
                callback.tb_writer = None
    return metrics
