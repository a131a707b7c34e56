"""Find the checkpoint to resume from: `resume=auto`, a run folder, or a checkpoint folder."""

from __future__ import annotations

import re
from pathlib import Path

from lorasft.config import OutputSection

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in step order. Trainer writes trainer_state.json last, so a folder without it
    was cut off mid-save (for example by kill -9) and is not resumed from."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def runs_of(output: OutputSection) -> list[Path]:
    if output.run_dir:
        return [Path(output.run_dir)]
    root = Path(output.dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{output.name}-*") if p.is_dir())


def find_resume(resume: str, output: OutputSection) -> tuple[Path, str] | None:
    """(run folder, checkpoint) to continue, or None when `auto` finds nothing to resume."""
    if resume != "auto":
        p = Path(resume)
        if CHECKPOINT.match(p.name) and (p / "trainer_state.json").is_file():
            return p.parent.parent, str(p)
        ckpts = complete_checkpoints(p)
        if not ckpts:
            raise FileNotFoundError(f"train.resume={resume}: no complete checkpoint found there")
        return p, str(ckpts[-1])
    for run in reversed(runs_of(output)):
        ckpts = complete_checkpoints(run)
        if ckpts:
            return run, str(ckpts[-1])
    return None
