"""The sweep that chooses lorasft's general defaults (issue 13): every recipe on every task of
`bench/recipe_tasks.py`, on the default model, each trained with `lorasft train` from the same
starting config (lorasft's defaults plus the recipe's settings) and scored on the task's test
split with the task's metric; wall-clock per run. Prints one table and, per task, each recipe's
score as a share of that task's best. Resumable: finished runs (results.json) are read, not
retrained.

    python bench/recipe_sweep.py [--out bench-out/sweep] [--tasks country_zh utc_offset]
                                 [--recipes defaults all-linear-r16-lr1e-3] [--max-steps N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from recipe_tasks import TASKS, write  # bench/ is the script's folder

# Each recipe: lorasft settings on top of its defaults (what a user changes, nothing else).
RECIPES: dict[str, list[str]] = {
    "defaults": [],
    "qv-r8-lr1e-3": ["train.learning_rate=1e-3"],
    "attn-r8-lr1e-3": ["lora.target_modules=[q_proj,k_proj,v_proj,o_proj]", "train.learning_rate=1e-3"],
    "all-linear-r8-lr2e-4": ["lora.target_modules=all-linear"],
    "all-linear-r8-lr1e-3": ["lora.target_modules=all-linear", "train.learning_rate=1e-3"],
    "all-linear-r16-lr1e-3": ["lora.target_modules=all-linear", "lora.r=16", "lora.alpha=32",
                              "train.learning_rate=1e-3"],
    "all-linear-r16-lr1e-3-1ep": ["lora.target_modules=all-linear", "lora.r=16", "lora.alpha=32",
                                  "train.learning_rate=1e-3", "train.epochs=1"],
    "all-linear-r16-lr1e-3-neftune5": ["lora.target_modules=all-linear", "lora.r=16", "lora.alpha=32",
                                       "train.learning_rate=1e-3", "data.augment.neftune_noise_alpha=5"],
    "all-linear-r16-lr1e-3-nodrop": ["lora.target_modules=all-linear", "lora.r=16", "lora.alpha=32",
                                     "train.learning_rate=1e-3", "lora.dropout=0.0"],
}  # fmt: skip


def run_one(task_dir: Path, metric: str, recipe: str, out: Path, max_steps: int | None) -> dict:
    run = out / "runs" / f"{task_dir.name}--{recipe}"
    if not (run / "results.json").is_file():
        n_test = sum(1 for _ in (task_dir / "test.jsonl").open(encoding="utf-8"))
        run.parent.mkdir(parents=True, exist_ok=True)
        # A config file of its own: `lorasft train` without one runs the demo's settings
        # (all-linear, 1e-3, one epoch), which are not lorasft's defaults.
        config = run.parent / f"{run.name}.yaml"
        config.write_text("model:\n  path: default\n", encoding="utf-8")
        args = [sys.executable, "-m", "lorasft", "train", str(config), f"data.train_file={task_dir / 'train.jsonl'}",
                f"data.eval_file={task_dir / 'test.jsonl'}", f"eval.num_samples={n_test}",
                "eval.compare_base=true", "eval.max_new_tokens=48", f"output.run_dir={run}",
                *RECIPES[recipe]]  # fmt: skip
        if max_steps:
            args.append(f"train.max_steps={max_steps}")
        start = time.perf_counter()
        done = subprocess.run(args, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            return {"task": task_dir.name, "recipe": recipe, "error": done.stderr[-500:]}
        (run / "sweep_wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    res = json.loads((run / "results.json").read_text(encoding="utf-8"))
    ev = res["eval"]
    return {"task": task_dir.name, "recipe": recipe, "metric": metric,
            "tuned": ev["tuned"]["generation"].get(metric), "base": ev["base"]["generation"].get(metric),
            "steps": res["train"]["global_step"], "train_s": res["train"]["train_seconds"],
            "wall_s": float((run / "sweep_wall_s.txt").read_text())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out/sweep")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--max-steps", type=int, help="cap every run (a quick check of the sweep)")
    a = ap.parse_args()
    out = Path(a.out)
    write(out / "tasks")
    rows = []
    for task in a.tasks:
        for recipe in a.recipes:
            row = run_one(out / "tasks" / task, TASKS[task][1], recipe, out, a.max_steps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    report(rows)


def report(rows: list[dict]) -> None:
    best = {}
    for r in rows:
        if r.get("tuned") is not None:
            best[r["task"]] = max(best.get(r["task"], 0.0), r["tuned"])
    print(f"\n{'task':<14} {'recipe':<32} {'metric':<12} {'base':>6} {'tuned':>6} {'of best':>7} "
          f"{'steps':>5} {'wall s':>7}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['task']:<14} {r['recipe']:<32} FAILED: {r['error'][-120:]!r}")
            continue
        share = r["tuned"] / best[r["task"]] if best.get(r["task"]) else float("nan")
        print(f"{r['task']:<14} {r['recipe']:<32} {r['metric']:<12} {r['base']:>6.1f} {r['tuned']:>6.1f} "
              f"{share:>7.0%} {r['steps']:>5} {r['wall_s']:>7.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
