"""Fuzz lorasft's input handling for longer than `make test` does, and print, per target, the
cases tried and the crashes found (each with Hypothesis's shrunk example).

    python bench/fuzz.py --minutes 10            # every target, 10 minutes each
    python bench/fuzz.py --targets reader --minutes 1

Targets: `reader`, the data reader (`tests/data/fuzz_reader.py`: random bytes, random records of
every format, encodings, deep nesting, huge lines; the property: read with every bad record
located, or refused with an error naming the file); `config`, the config loader
(`tests/test_fuzz_config.py`: random YAML sections, keys, values and overrides; the property: a
Config that dump_config round-trips, or a ConfigError). The HTTP harnesses need a live server
and run in `make test` only (tests/serve/test_fuzz_http.py, tests/report/test_fuzz_ui.py). Rounds of 500 cases with seeds 0, 1, 2...
until the time is up, so a run is reproducible by its seed and length.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.data.fuzz_reader import files, read_or_refuse
from tests.test_fuzz_config import documents, load_document, overrides

TARGETS = {"reader": (files, read_or_refuse),
           "config": (st.tuples(documents(), overrides), load_document)}  # fmt: skip


def fuzz(name: str, minutes: float, first_seed: int = 0) -> tuple[int, list[str]]:
    """Cases tried and crashes (the failure, with its shrunk example) within `minutes`."""
    strategy, prop = TARGETS[name]
    tried, crashes, k = 0, [], first_seed
    end = time.monotonic() + 60 * minutes

    def check(case):
        nonlocal tried
        tried += 1
        prop(*case)

    while time.monotonic() < end:
        test = settings(max_examples=500, deadline=None, database=None,
                        phases=[Phase.generate, Phase.shrink],
                        suppress_health_check=list(HealthCheck))(given(strategy)(check))  # fmt: skip
        try:
            seed(k)(test)()
        except Exception as e:  # noqa: BLE001 (a crash found: kept and reported, the run goes on)
            notes = "\n".join(getattr(e, "__notes__", []))
            crashes.append(f"seed {k}: {type(e).__name__}: {e}\n{notes}")
        k += 1
    return tried, crashes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="per target")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--seed", type=int, default=0, help="the first round's seed")
    a = p.parse_args()
    for name in a.targets:
        start = time.monotonic()
        tried, crashes = fuzz(name, a.minutes, a.seed)
        print(f"{name}: {tried} cases in {(time.monotonic() - start) / 60:.1f} min, "
              f"{len(crashes)} crash(es)", flush=True)  # fmt: skip
        for c in crashes:
            print(f"  {c}", flush=True)


if __name__ == "__main__":
    main()
