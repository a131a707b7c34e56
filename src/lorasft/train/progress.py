"""Training progress a log file can hold: without a terminal, one plain line per logging step
(step, loss, tokens/s, elapsed, ETA) instead of progress-bar redraws; with one, the usual bar."""

from __future__ import annotations

import sys
import time

from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from lorasft.run_files import PROGRESS


def on_terminal() -> bool:
    return sys.stderr.isatty()


def clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Pace(TrainerCallback):
    """Time, steps and tokens since this training (re)started, for progress reports."""

    def on_train_begin(self, args, state, control, **kw):
        self.start, self.first_step = time.perf_counter(), state.global_step
        self.first_tokens = state.num_input_tokens_seen

    def pace(self, state) -> tuple[float, int, int, float | None]:
        """(seconds elapsed, steps done, steps left, non-padding tokens per second or None)."""
        elapsed = time.perf_counter() - self.start
        tokens = state.num_input_tokens_seen - self.first_tokens
        speed = tokens / elapsed if tokens and elapsed > 0 else None
        left = max(state.max_steps - state.global_step, 0)
        return elapsed, state.global_step - self.first_step, left, speed


class ProgressLines(Pace):
    """`[lorasft] step 10/30 loss 0.412 lr 8.0e-04 | 265 tok/s | 0m40s elapsed, ETA 1m20s`, and
    `[lorasft] step 15/30 eval loss 0.118` after each evaluation (rank 0 only)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        step = f"[lorasft] step {state.global_step}/{state.max_steps}"
        if "eval_loss" in logs:
            print(f"{step} eval loss {logs['eval_loss']:.4f}", file=self.stream, flush=True)
        elif "loss" in logs:
            print(f"{step} {self.train_line(state, logs)}", file=self.stream, flush=True)

    def train_line(self, state, logs) -> str:
        elapsed, done, left, tok_s = self.pace(state)
        eta = elapsed / max(done, 1) * left
        speed = f" | {tok_s:.0f} tok/s" if tok_s is not None else ""
        lr = logs.get("learning_rate")
        lr = f" lr {float(lr):.1e}" if lr is not None else ""
        return (f"loss {float(logs['loss']):.4f}{lr}{speed} | {clock(elapsed)} elapsed, "
                f"ETA {clock(eta)}")  # fmt: skip


def readable_progress(trainer: Trainer) -> None:
    """With no terminal, swap the Trainer's bar (or its raw dict printer) for plain lines."""
    if on_terminal():
        return
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ProgressLines())


class ProgressFile(Pace):
    """`progress.json` in the run folder, rewritten (atomically) at every log: what `lorasft
    runs` and `lorasft ui` show while a run trains: step, losses so far, tokens/s, ETA, and the
    process id (a run whose process is gone without results.json has failed)."""

    def __init__(self, run_dir):
        from pathlib import Path

        self.path = Path(run_dir) / PROGRESS
        self.log: list[dict] = []

    def on_train_begin(self, args, state, control, **kw):
        super().on_train_begin(args, state, control, **kw)
        self._write(state, "training")

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs:
            self.log.append({"step": state.global_step, "eval_loss": float(logs["eval_loss"])})
        elif "loss" in logs:
            self.log.append({"step": state.global_step, "loss": float(logs["loss"])})
        self._write(state, "training")

    def on_train_end(self, args, state, control, **kw):
        self._write(state, "evaluating")  # results.json follows after the final evaluation

    def _write(self, state, status: str) -> None:
        if not state.is_world_process_zero:
            return
        import os

        from lorasft.run_files import write_json

        elapsed, done, left, tok_s = self.pace(state)
        info = {"status": status, "pid": os.getpid(), "step": state.global_step,
                "max_steps": state.max_steps, "elapsed_s": round(elapsed, 1),
                "eta_s": round(elapsed / done * left, 1) if done else None,
                "tokens_per_s": round(tok_s, 1) if tok_s is not None else None,
                "updated": time.time(), "log": self.log}  # fmt: skip
        write_json(self.path, info, indent=None)
