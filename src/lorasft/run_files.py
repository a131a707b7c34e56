"""The run folder's file names (one home for them: training writes, evaluation, reports, the
dashboard and serving read), and the one way lorasft writes a file that another process may read
while it is written: whole into a temporary file beside it, then renamed into place, so a
reader sees the old file or the new one, never half of one (docs/run-folder.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"  # the resolved config (a stage's own in stages/<n>-<name>/)
RUN_INFO = "lorasft_run.json"  # what the run trained with: base, precision, versions
PROGRESS = "progress.json"  # status, step, ETA and log while training (the dashboard polls it)
RESULTS = "results.json"  # everything measured, written once the run finished
SAMPLES = "samples.md"
LOSS_CURVE = "loss_curve.png"
REPORT = "report.html"
EVAL_RESULTS = "eval_results.json"  # `lorasft eval` of a finished run
EVAL_SAMPLES = "eval_samples.md"
STAGE_DONE = "stage_done.json"  # a finished stage of a staged run (stages/<n>-<name>/)
INITIAL_ADAPTER = "initial_adapter"  # lora.init pissa/olora: the adapter as initialised (for the
# conversion of the trained one into a plain LoRA on the unchanged base)


@contextmanager
def replaced(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; renamed onto `path` when the block
    ends without an exception (removed when it raises)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) whole, then rename it into place."""
    with replaced(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON file another process writes, or None while it is missing or unreadable (an older
    writer, a copy in progress, a disk that filled up): polling readers try again later."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
