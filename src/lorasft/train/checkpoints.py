"""Find the checkpoint to resume from: `resume=auto`, a run folder, or a checkpoint folder."""

from __future__ import annotations

import re
from datetime import datetime
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


STAMP = "%Y%m%d-%H%M%S"
STAMP_PATTERN = r"\d{8}-\d{6}"


def new_run_dir(output: OutputSection, now: datetime) -> Path:
    if output.run_dir:
        return Path(output.run_dir)
    return Path(output.dir) / f"{output.name}-{now.strftime(STAMP)}"


def runs_of(output: OutputSection) -> list[Path]:
    """This run name's folders, oldest first: `<name>-<timestamp>` exactly, so the runs of `demo`
    never include those of `demo-long`."""
    if output.run_dir:
        return [Path(output.run_dir)]
    root = Path(output.dir)
    if not root.is_dir():
        return []
    own = re.compile(rf"^{re.escape(output.name)}-{STAMP_PATTERN}$")
    return sorted(p for p in root.iterdir() if p.is_dir() and own.match(p.name))


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


def find_staged_run(resume: str, output: OutputSection) -> Path | None:
    """The staged run to continue: `auto` is the newest run of this name with a `stages` folder
    (None: start a new one); otherwise the run folder given."""
    if resume == "auto":
        return next((r for r in reversed(runs_of(output)) if (r / "stages").is_dir()), None)
    p = Path(resume)
    if not (p / "stages").is_dir():
        raise FileNotFoundError(
            f"train.resume={resume}: not the folder of a staged run (no stages/ inside); give the "
            "run folder, or train.resume=auto"
        )
    return p
