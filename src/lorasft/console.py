"""One way lorasft tells the user something: `say`."""

from __future__ import annotations

import os
import sys


def say(message: str) -> None:
    """`[lorasft] message` on stderr (stdout carries what a command outputs: tables, reports,
    answers), from the first process of a torchrun/accelerate launch only (each process has its
    RANK; one process has none)."""
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"[lorasft] {message}", file=sys.stderr, flush=True)
