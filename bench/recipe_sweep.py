"""The sweep that chooses lorasft's general defaults (issue 13): every recipe on every task of
`bench/recipe_tasks.py`, on the default model, each trained with `lorasft train` from the same
starting config (only the model, plus the recipe's settings), its checkpoint picked on the
validation share lorasft holds out of the training file, then scored by `lorasft eval` on the
task's test split with the task's metric; wall-clock per run (training and scoring). Prints one table and, per task, each recipe's
score as a share of that task's best. Resumable: finished runs (results.json) are read, not
retrained.

    python bench/recipe_sweep.py [--out bench-out/sweep] [--tasks country_zh utc_offset]
                                 [--recipes defaults all-linear-r16-lr1e-3] [--max-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recipe_tasks import SWEPT, TASKS, write  # bench/ is the script's folder

# Each recipe: lorasft settings on top of a config holding only the model, every setting the
# sweep varies spelled out, so a recipe keeps its meaning when lorasft's defaults change.
# Around one centre (all-linear, r16, 1e-3, 3 epochs), one axis at a time.
QV, ATTN, ALL = "[q_proj,v_proj]", "[q_proj,k_proj,v_proj,o_proj]", "all-linear"


def recipe(modules: str, r: int, lr: str, epochs: int = 3, neftune: float | None = None,
           dropout: float = 0.05) -> list[str]:  # fmt: skip
    return [f"lora.target_modules={modules}", f"lora.r={r}", f"lora.alpha={2 * r}",
            f"train.learning_rate={lr}", f"train.epochs={epochs}",
            f"data.augment.neftune_noise_alpha={'null' if neftune is None else neftune}",
            f"lora.dropout={dropout}"]  # fmt: skip


RECIPES: dict[str, list[str]] = {  # in the order they run: the likeliest to matter first
    "qv-r8-lr2e-4": recipe(QV, 8, "2e-4"),  # lorasft's defaults before this sweep
    "all-r16-lr1e-3": recipe(ALL, 16, "1e-3"),
    "all-r16-lr1e-3-1ep": recipe(ALL, 16, "1e-3", epochs=1),
    "all-r8-lr1e-3": recipe(ALL, 8, "1e-3"),
    "attn-r8-lr1e-3": recipe(ATTN, 8, "1e-3"),
    "qv-r8-lr1e-3": recipe(QV, 8, "1e-3"),
    "all-r16-lr1e-3-nodrop": recipe(ALL, 16, "1e-3", dropout=0.0),
    "all-r16-lr1e-3-neftune5": recipe(ALL, 16, "1e-3", neftune=5.0),
}


def run_one(task_dir: Path, metric: str, recipe: str, out: Path, max_steps: int | None,
            threads: int) -> dict:  # fmt: skip
    run = out / "runs" / f"{task_dir.name}--{recipe}"
    test = task_dir / "test.jsonl"
    if not (run / "eval_results.json").is_file():
        n_test = sum(1 for _ in test.open(encoding="utf-8"))
        run.parent.mkdir(parents=True, exist_ok=True)
        # A config file of its own: `lorasft train` without one runs the demo's settings
        # (all-linear, 1e-3, one epoch), which are not lorasft's defaults.
        config = run.parent / f"{run.name}.yaml"
        config.write_text("model:\n  path: default\n", encoding="utf-8")
        # Trained as a user would: the validation share lorasft holds out of the training file
        # picks the checkpoint and stops early; the test split is seen only by `lorasft eval`,
        # with batched answers as they come (eval.exact_greedy=false: scoring an unsure model
        # exactly as one at a time would cost up to twice the time; near ties are noise here).
        train = [sys.executable, "-m", "lorasft", "train", str(config),
                 f"data.train_file={task_dir / 'train.jsonl'}", "eval.num_samples=0",
                 "eval.compare_base=true", "eval.max_new_tokens=48", "eval.exact_greedy=false",
                 f"output.run_dir={run}",
                 *RECIPES[recipe], *([f"train.max_steps={max_steps}"] if max_steps else [])]  # fmt: skip
        score = [sys.executable, "-m", "lorasft", "eval", str(run), "--data", str(test),
                 "--num-samples", str(n_test)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        for args, timing in (
            (train, run / "sweep_train_wall_s.txt"),
            (score, run / "sweep_eval_wall_s.txt"),
        ):
            if timing.is_file():  # this step finished before (a resumed sweep)
                continue
            start = time.perf_counter()
            done = subprocess.run(args, check=False, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                return {"task": task_dir.name, "recipe": recipe, "error": done.stderr[-500:]}
            timing.write_text(f"{time.perf_counter() - start:.1f}\n")
    res = json.loads((run / "results.json").read_text(encoding="utf-8"))
    ev = json.loads((run / "eval_results.json").read_text(encoding="utf-8"))
    return {"task": task_dir.name, "recipe": recipe, "metric": metric,
            "tuned": ev["tuned"]["generation"].get(metric), "base": ev["base"]["generation"].get(metric),
            "steps": res["train"]["global_step"], "train_s": res["train"]["train_seconds"],
            "wall_s": sum(float((run / f"sweep_{step}_wall_s.txt").read_text()) for step in ("train", "eval")),
            "redone_alone": ev.get("generation_redone_alone")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out/sweep")
    ap.add_argument("--tasks", nargs="*", default=SWEPT, choices=list(TASKS))
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--max-steps", type=int, help="cap every run (a quick check of the sweep)")
    ap.add_argument("--parallel", type=int, default=1,
                    help="runs at once, the CPU's cores shared out as OMP threads")  # fmt: skip
    a = ap.parse_args()
    out = Path(a.out)
    write(out / "tasks")
    threads = max(1, (os.cpu_count() or 1) // a.parallel)
    # Recipe by recipe (every task's row of a recipe before the next recipe): a sweep cut short
    # still compares whole recipes.
    jobs = [(t, r) for r in a.recipes for t in a.tasks]

    def one(job: tuple[str, str]) -> dict:
        t, r = job
        row = run_one(out / "tasks" / t, TASKS[t][1], r, out, a.max_steps, threads)
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(a.parallel) as pool:
        rows = list(pool.map(one, jobs))
    (out / "sweep.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    report(rows)


def report(rows: list[dict]) -> None:
    best = {}
    for r in rows:
        if r.get("tuned") is not None:
            best[r["task"]] = max(best.get(r["task"], 0.0), r["tuned"])
    print(f"\n{'task':<16} {'recipe':<32} {'metric':<12} {'base':>6} {'tuned':>6} {'of best':>7} "
          f"{'steps':>5} {'wall s':>7}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['task']:<16} {r['recipe']:<32} FAILED: {r['error'][-120:]!r}")
            continue
        share = r["tuned"] / best[r["task"]] if best.get(r["task"]) else float("nan")
        print(f"{r['task']:<16} {r['recipe']:<32} {r['metric']:<12} {r['base']:>6.1f} {r['tuned']:>6.1f} "
              f"{share:>7.0%} {r['steps']:>5} {r['wall_s']:>7.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
