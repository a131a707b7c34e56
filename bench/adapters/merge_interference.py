"""What merging two task adapters costs each task (issue 35): two adapters of the default model,
trained with lorasft's defaults on two different tasks of `bench/defaults/recipe_tasks.py`, each scored
alone on both tasks, then combined by every method of `lorasft merge --method` into one adapter
(`--adapter-out`, a run folder) and scored on both tasks: each cell is the task's score and its
share of that task's own adapter's score (interference: how much of it the merge keeps).

Every score is `lorasft eval RUN --data TEST` on the task's test split, the sweep's metric
(bench/defaults/recipe_sweep.py). `linear` in lorasft merges into the weights and writes no adapter;
`cat` is the same sum as one adapter (tests/export/test_merge_methods.py: equal logits within
1e-4), so its row is linear's. Resumable: a step whose output exists is not run again.

    python bench/adapters/merge_interference.py [--out bench-out/interference] [--tasks A B]
                                       [--weights 1.0 1.0] [--density 0.5] [--parallel 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# the sweep's tasks and how it trains and scores a run
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "defaults"))
from recipe_sweep import CHOSEN, DEFAULT_SEED, eval_command, train_command
from recipe_tasks import TASKS, write

from lorasft.export import METHODS as MERGE_METHODS
from lorasft.export import PRUNING

METHODS = MERGE_METHODS[1:]  # linear writes no adapter; cat is the same sum as one


def run(args: list[str], threads: int) -> float:
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(args, check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def train(task_dir: Path, out: Path, threads: int) -> Path:
    folder = out / "runs" / f"{task_dir.name}--{CHOSEN}"
    if not (folder / "results.json").is_file():
        run(train_command(task_dir, CHOSEN, folder, DEFAULT_SEED), threads)
    return folder


def score(folder: Path, task_dir: Path, threads: int) -> dict:
    """The run's score on the task's test split (eval_results.json kept per task)."""
    saved = folder / f"score-{task_dir.name}.json"
    if not saved.is_file():
        seconds = run(eval_command(folder, task_dir / "test.jsonl"), threads)
        ev = json.loads((folder / "eval_results.json").read_text(encoding="utf-8"))
        metric = TASKS[task_dir.name][1]
        saved.write_text(json.dumps({"score": ev["tuned"]["generation"].get(metric),
                                     "base": ev["base"]["generation"].get(metric),
                                     "n": ev["tuned"]["generation"]["n"], "metric": metric,
                                     "seconds": round(seconds, 1)}))  # fmt: skip
    return json.loads(saved.read_text())


def scores_of(folder: Path, dirs: list[Path], threads: int) -> dict:
    return {d.name: score(folder, d, threads) for d in dirs}


def combine(runs: list[Path], method: str, out: Path, weights: list[float],
            density: float) -> Path:  # fmt: skip
    folder = out / "combined" / method
    if not (folder / "adapter_model.safetensors").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a combination cut off before it was written
        extra = ["--density", str(density)] if method in PRUNING else []
        run([sys.executable, "-m", "lorasft", "merge", str(runs[0]), "--also", str(runs[1]),
             "--adapter-out", str(folder), "--method", method, "--weights",
             *map(str, weights), *extra], 2)  # fmt: skip
    return folder


def table(tasks: list[str], singles: dict, combined: dict, weights: list[float],
          density: float) -> str:  # fmt: skip
    metric = {t: singles[t][t]["metric"] for t in tasks}
    own = {t: singles[t][t]["score"] for t in tasks}
    head = [f"{t} ({metric[t]}, n={singles[t][t]['n']})" for t in tasks]
    lines = [
        "| adapter | " + " | ".join(head) + " | worst share |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    base = [f"{singles[tasks[0]][t]['base'] or 0:.1f}" for t in tasks]
    lines.append("| base (no adapter) | " + " | ".join(base) + " | |")

    def row(name: str, scores: dict) -> str:
        got = {t: scores[t]["score"] for t in tasks}
        shares = {t: got[t] / own[t] if got[t] is not None and own[t] else None for t in tasks}
        cells = [("—" if got[t] is None else f"{got[t]:.1f}")
                 + (f" ({shares[t]:.0%})" if shares[t] is not None else "") for t in tasks]  # fmt: skip
        known = [s for s in shares.values() if s is not None]
        worst = f"{min(known):.0%}" if known else "—"
        return f"| {name} | " + " | ".join(cells) + f" | {worst} |"

    for t in tasks:
        lines.append(row(f"{t} adapter alone", singles[t]))
    for m, scores in combined.items():
        label = "cat (= linear)" if m == "cat" else m
        if m in PRUNING:
            label += f", density {density}"
        lines.append(row(label, scores))
    lines.append(f"\nweights {weights[0]:g} / {weights[1]:g}; each cell: score (share of the "
                 "task's own adapter's score)")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/interference"))
    ap.add_argument("--tasks", nargs=2, default=["country_codes", "language_names"],
                    choices=list(TASKS))  # fmt: skip
    ap.add_argument("--weights", nargs=2, type=float, default=[1.0, 1.0])
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--parallel", type=int, default=2, help="steps at once (one thread each)")
    a = ap.parse_args()
    start = time.perf_counter()
    write(a.out / "tasks")
    dirs = [a.out / "tasks" / t for t in a.tasks]
    threads = max(1, (os.cpu_count() or 2) // a.parallel)
    with ThreadPoolExecutor(a.parallel) as pool:
        runs = list(pool.map(lambda d: train(d, a.out, threads), dirs))
        # a folder's two evaluations one after the other (both write its eval_results.json);
        # different folders at once
        singles = dict(zip(a.tasks, pool.map(lambda r: scores_of(r, dirs, threads), runs)))
        folders = {m: combine(runs, m, a.out, a.weights, a.density) for m in METHODS}
        combined = dict(zip(folders, pool.map(lambda f: scores_of(f, dirs, threads),
                                              folders.values())))  # fmt: skip
    text = table(a.tasks, singles, combined, a.weights, a.density)
    print(text)
    (a.out / "interference.json").write_text(json.dumps(
        {"tasks": a.tasks, "weights": a.weights, "density": a.density, "singles": singles,
         "combined": combined, "wall_s": round(time.perf_counter() - start, 1)}, indent=1))  # fmt: skip
    print(f"\nwall: {time.perf_counter() - start:.0f} s; rows: {a.out / 'interference.json'}")


if __name__ == "__main__":
    main()
