"""Running a fuzz property in rounds: a fixed budget with a fixed seed in `make test`, or for
N minutes (`bench/fuzz/fuzz.py`), counting cases and keeping every failure with its shrunk example.

A test that calls `rounds` reads its budget from the environment: `LORASFT_FUZZ_MINUTES` (rounds
of 500 cases with seeds 0, 1, 2... until the time is up; from `LORASFT_FUZZ_SEED`) or else one
round of `examples` cases with seed 0; `LORASFT_FUZZ_REPORT=FILE` makes `report` append the
target's figures to FILE (JSON lines), which is how the bench reads targets that need a server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.strategies import SearchStrategy

ROUND = 500


def rounds(strategy: SearchStrategy, prop: Callable, minutes: float | None = None,
           examples: int = ROUND, first_seed: int = 0) -> tuple[int, list[str]]:  # fmt: skip
    """Cases tried and failures found: `prop(case)` on cases drawn from `strategy`, in rounds of
    `examples` with seeds first_seed, first_seed + 1, ... for `minutes` (None: one round)."""
    tried, crashes, k = 0, [], first_seed
    end = time.monotonic() + 60 * minutes if minutes is not None else None

    def check(case):
        nonlocal tried
        tried += 1
        prop(case)

    while True:
        test = settings(max_examples=examples, deadline=None, database=None,
                        phases=[Phase.generate, Phase.shrink],
                        suppress_health_check=list(HealthCheck))(given(strategy)(check))  # fmt: skip
        try:
            seed(k)(test)()
        except Exception as e:  # noqa: BLE001 (a failure found: kept and reported, the run goes on)
            crashes += [f"seed {k}: {d}" for d in describe(e)]
        k += 1
        if end is None or time.monotonic() >= end:
            return tried, crashes


def describe(e: BaseException) -> list[str]:
    """Each failure in `e` (Hypothesis groups distinct ones) with its shrunk example."""
    if isinstance(e, BaseExceptionGroup):
        return [d for sub in e.exceptions for d in describe(sub)]
    notes = "\n".join(getattr(e, "__notes__", []))
    return [f"{type(e).__name__}: {str(e)[:2000]}\n{notes[:4000]}"]


def budget(examples: int) -> dict:
    """`rounds` keyword arguments from the environment (see the module's docstring)."""
    minutes = os.environ.get("LORASFT_FUZZ_MINUTES")
    if minutes:
        return {
            "minutes": float(minutes),
            "first_seed": int(os.environ.get("LORASFT_FUZZ_SEED", "0")),
        }
    return {"examples": examples}


def report(target: str, tried: int, crashes: list[str], seconds: float) -> None:
    path = os.environ.get("LORASFT_FUZZ_REPORT")
    if path:
        row = {"target": target, "tried": tried, "crashes": crashes, "seconds": round(seconds, 1)}
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def fuzz_target(target: str, strategy: SearchStrategy, prop: Callable, examples: int) -> None:
    """A test's body: run the target on its budget, report it, fail on the first failure."""
    start = time.monotonic()
    tried, crashes = rounds(strategy, prop, **budget(examples))
    report(target, tried, crashes, time.monotonic() - start)
    assert tried > 0
    shown = "\n".join(crashes[:3])
    assert not crashes, f"{len(crashes)} failure(s) in {tried} cases; the first:\n{shown}"
