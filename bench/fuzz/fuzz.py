"""Fuzz lorasft's input handling for longer than `make test` does, and print, per target, the
cases tried and the crashes found (each with Hypothesis's shrunk example).

    python bench/fuzz/fuzz.py --minutes 10            # every target, 10 minutes each
    python bench/fuzz/fuzz.py --targets reader --minutes 1

Targets: `reader`, the data reader (`tests/data/fuzz_reader.py`: random bytes, random records of
every format, encodings, deep nesting, huge lines; the property: read with every bad record
located, or refused with an error naming the file); `data-check`, `lorasft data check` on folders
of random files (mixed formats, empty and binary files; exit 0, 1 with each bad record located, or
2 with an error naming the file); `config`, the config loader (`tests/test_fuzz_config.py`: random
YAML sections, keys, values and overrides, anchors and aliases, huge values; the property: a Config
that dump_config round-trips, or a ConfigError); `serve` and `ui`, the HTTP servers on the wire
(`tests/serve/test_fuzz_wire.py`, `tests/report/test_fuzz_ui.py`: any method, route, headers, key,
content type and body, slow, chunked, truncated or abandoned; the property: only documented
statuses, and the same good request answered the same after every request). `data-check`, `serve`
and `ui` run through pytest, for the tiny model and live server its fixtures build
(LORASFT_FUZZ_MINUTES). Rounds of 500 cases with seeds 0, 1, 2... until the time is up
(tests/fuzzing.py), so a run is reproducible by its seed and length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hypothesis import strategies as st

from tests.data.fuzz_reader import files, read_or_refuse
from tests.fuzzing import rounds
from tests.test_fuzz_config import anchored_yaml, documents, load_document, load_text, overrides


def load_config_case(case) -> None:
    kind, value = case
    load_text(value) if kind == "yaml" else load_document(*value)


CONFIGS = (st.tuples(st.just("doc"), st.tuples(documents(), overrides))
           | st.tuples(st.just("yaml"), anchored_yaml()))  # fmt: skip
IN_PROCESS = {"reader": (files, lambda case: read_or_refuse(*case)),
              "config": (CONFIGS, load_config_case)}  # fmt: skip
IN_PYTEST = {"data-check": "tests/data/test_fuzz_reader.py::test_data_check_on_any_folder",
          "serve": "tests/serve/test_fuzz_wire.py::test_no_request_on_the_wire_breaks_the_server",
          "ui": "tests/report/test_fuzz_ui.py::test_no_request_on_the_wire_breaks_the_ui"}  # fmt: skip
TARGETS = [*IN_PROCESS, *IN_PYTEST]


def fuzz_in_pytest(name: str, minutes: float, first_seed: int) -> tuple[int, list[str]]:
    """A target that needs pytest's fixtures (a live server, a tiny model): its test, with the
    time budget in the environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"
        env = {**os.environ, "LORASFT_FUZZ_MINUTES": str(minutes),
               "LORASFT_FUZZ_SEED": str(first_seed), "LORASFT_FUZZ_REPORT": str(report)}  # fmt: skip
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            IN_PYTEST[name],
        ]
        done = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
        if not report.is_file():  # the server never came up: not a fuzz result
            raise SystemExit(
                f"{name}: the test did not run\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
            )
        row = json.loads(report.read_text().splitlines()[-1])
    return row["tried"], row["crashes"]


def fuzz(name: str, minutes: float, first_seed: int = 0) -> tuple[int, list[str]]:
    """Cases tried and crashes (the failure, with its shrunk example) within `minutes`."""
    if name in IN_PYTEST:
        return fuzz_in_pytest(name, minutes, first_seed)
    strategy, prop = IN_PROCESS[name]
    return rounds(strategy, prop, minutes=minutes, first_seed=first_seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="per target")
    p.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
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
