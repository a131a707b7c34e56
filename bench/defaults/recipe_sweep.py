"""The sweep that chooses lorasft's general defaults (issue 13): every recipe on every task of
`bench/defaults/recipe_tasks.py` (by default the four in `SWEPT`), on the default model. Each run starts
from a config holding only the model, plus the recipe's settings; `lorasft train` picks its
checkpoint on the validation share it holds out of the training file, then `lorasft eval` scores
it on the task's test split with the task's metric. Prints one markdown table: each recipe's
score per task, its share of that task's best, its worst share, its training minutes.
Resumable: a step (train, eval) whose timing file exists is not run again.

    python bench/defaults/recipe_sweep.py [--out bench-out/sweep] [--tasks utc_offset ...]
                                 [--recipes qv-r8-lr2e-4 ...] [--parallel 2] [--max-steps N]
                                 [--seeds 42 1 2] [--report-only]
    python bench/defaults/recipe_sweep.py --rows bench/defaults/results/sweep-*.json [--tasks ...] [--recipes ...]

With several `--seeds` (train.seed: LoRA's initial weights, the order of the batches, dropout
and NEFTune's noise; the validation share stays the same) each cell is the mean over its seeds,
and the seeds' scores are listed beside it. Every run's row (score, precision, checkpoint step,
times) is added to OUT/sweep.json (replacing an earlier row of the same task, recipe and seed);
the rows behind bench/defaults/README.md's tables are kept in `bench/defaults/results/`, and `--rows` prints the
table of saved rows (only those of the tasks, recipes and seeds named, when named), so a sweep
continued on another day or machine can be reported with the runs before it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recipe_tasks import SWEPT, TASKS, build, write  # the script's folder

# Each recipe: lorasft settings on top of a config holding only the model, every setting the
# sweep varies spelled out, so a recipe keeps its meaning when lorasft's defaults change.
# Around one centre (all-linear, r16, 1e-3, 3 epochs), one axis at a time.
# "attention" is q_proj, k_proj, v_proj and o_proj on the default model (a Llama), the list the
# sweep's first runs named (tests/model/test_lora.py).
QV, ATTN, ALL = "[q_proj,v_proj]", "attention", "all-linear"


# What every recipe holds fixed (lorasft's defaults when the sweep ran): spelled out too, so the
# test that pins the defaults to the chosen recipe also notices a change to these.
HELD = ["train.batch_size=8", "train.lr_scheduler=cosine", "train.warmup_ratio=0.05",
        "train.weight_decay=0.0", "data.val_ratio=0.1", "train.eval_steps=20",
        "train.early_stopping_patience=3", "train.metric_for_best_model=eval_loss",
        "train.load_best_model_at_end=true", "data.augment.ratio=0"]  # fmt: skip


def recipe(modules: str, r: int, lr: str, epochs: int = 3, neftune: float | None = None,
           dropout: float = 0.05) -> list[str]:  # fmt: skip
    return [f"lora.target_modules={modules}", f"lora.r={r}", f"lora.alpha={2 * r}",
            f"train.learning_rate={lr}", f"train.epochs={epochs}",
            f"data.augment.neftune_noise_alpha={'null' if neftune is None else neftune}",
            f"lora.dropout={dropout}", *HELD]  # fmt: skip


CHOSEN = "attn-r8-lr1e-3-patience1"
"""lorasft's defaults since the sweep (tests/test_config.py pins them; bench/defaults/README.md):
`attn-r8-lr1e-3`, chosen by the sweep, stopping at the first evaluation that does not improve
(issue 34: it kept every task's score)."""
CHOSEN_HAN = "all-r16-lr1e-3-neftune5-patience1"
"""What lorasft's defaults become on training answers mostly in Chinese characters
(`lora.by_answer_language`; tests/test_config.py pins it too)."""


def defaults_recipe(train: list[dict]) -> str:
    """The recipe lorasft's defaults run on these training records: CHOSEN_HAN where their
    answers are mostly Chinese characters, as `lorasft train` finds them, CHOSEN otherwise."""
    from lorasft.config import for_answers, load_config
    from lorasft.data.formats import detect_format, normalise
    from lorasft.data.prepare import answer_han_share

    records = [(str(i), r) for i, r in enumerate(train)]
    fmt = detect_format(records, Path("train.jsonl"))
    share = answer_han_share([normalise(r, fmt) for _, r in records])
    return CHOSEN_HAN if for_answers(load_config(None), share)[1]["applied"] else CHOSEN


def defaults_by_task(rows: list[dict]) -> dict[str, str]:
    """`defaults_recipe` of each task of these rows, on its training split."""
    return {t: defaults_recipe(build(t)[0]) for t in dict.fromkeys(r["task"] for r in rows)}


RECIPES: dict[str, list[str]] = {  # in the order they run: the likeliest to matter first
    "qv-r8-lr2e-4": recipe(QV, 8, "2e-4"),  # lorasft's defaults before this sweep
    "all-r16-lr1e-3": recipe(ALL, 16, "1e-3"),
    "all-r16-lr1e-3-1ep": recipe(ALL, 16, "1e-3", epochs=1),
    "all-r16-lr1e-3-2ep": recipe(ALL, 16, "1e-3", epochs=2),
    "all-r8-lr1e-3": recipe(ALL, 8, "1e-3"),
    "attn-r8-lr1e-3": recipe(ATTN, 8, "1e-3"),
    "attn-r16-lr1e-3": recipe(ATTN, 16, "1e-3"),  # after the first pass: between its finalists
    "attn-r16-lr1e-3-neftune5": recipe(ATTN, 16, "1e-3", neftune=5.0),  # and with NEFTune
    "attn-r16-lr1e-3-5ep": recipe(ATTN, 16, "1e-3", epochs=5),  # more epochs for small data?
    "qv-r8-lr1e-3": recipe(QV, 8, "1e-3"),
    "all-r16-lr1e-3-nodrop": recipe(ALL, 16, "1e-3", dropout=0.0),
    "all-r16-lr1e-3-neftune5": recipe(ALL, 16, "1e-3", neftune=5.0),
    # every linear layer, trained more gently: the Chinese task's gain without the chat's loss?
    "all-r16-lr5e-4": recipe(ALL, 16, "5e-4"),
    # issue 35: PEFT's variants on the chosen recipe (the defaults change only if one wins by
    # more than a seed's spread)
    "attn-r8-lr1e-3-rslora": [*recipe(ATTN, 8, "1e-3"), "lora.use_rslora=true"],
    "attn-r8-lr1e-3-dora": [*recipe(ATTN, 8, "1e-3"), "lora.use_dora=true"],
    "attn-r8-lr1e-3-pissa": [*recipe(ATTN, 8, "1e-3"), "lora.init=pissa"],
    "attn-r8-lr1e-3-olora": [*recipe(ATTN, 8, "1e-3"), "lora.init=olora"],
    "attn-r8-lr1e-3-loraplus16": [*recipe(ATTN, 8, "1e-3"), "train.loraplus_lr_ratio=16"],
    # issue 34: stop at the first evaluation that does not improve (HELD's patience is 3); with
    # the same seed the run is the chosen recipe's up to where it stops (the schedule is set by
    # the epochs), so its score is the chosen one's wherever it keeps the same best checkpoint
    "attn-r8-lr1e-3-patience1": [*recipe(ATTN, 8, "1e-3"), "train.early_stopping_patience=1"],
    "all-r16-lr1e-3-neftune5-patience1": [
        *recipe(ALL, 16, "1e-3", neftune=5.0),
        "train.early_stopping_patience=1",
    ],
}


DEFAULT_SEED = 42
"""lorasft's train.seed: the seed of a run named without one."""


def run_dir(out: Path, task: str, recipe: str, seed: int) -> Path:
    return out / "runs" / f"{task}--{recipe}{'' if seed == DEFAULT_SEED else f'--seed{seed}'}"


def timing_files(run: Path) -> dict[str, Path]:
    """A step's wall-clock seconds, written when it finished."""
    return {"train": run / "sweep_train_wall_s.txt", "eval": run / "sweep_eval_wall_s.txt"}


def train_command(task_dir: Path, recipe: str, run: Path, seed: int,
                  extra: list[str] | None = None) -> list[str]:  # fmt: skip
    """`lorasft train` of a recipe on a task's training file into `run`, as a user would: the
    validation share lorasft holds out of the training file picks the checkpoint and stops early;
    the test split is seen only by `lorasft eval`. `extra`: overrides after the recipe's."""
    run.parent.mkdir(parents=True, exist_ok=True)
    # A config file of its own: `lorasft train` without one runs the demo's settings.
    config = run.parent / f"{run.name}.yaml"
    config.write_text("model:\n  path: default\n", encoding="utf-8")
    # Batched answers as they come (eval.exact_greedy=false: scoring an unsure model exactly as
    # one at a time would cost up to twice the time; near ties are noise here).
    return [sys.executable, "-m", "lorasft", "train", str(config),
            f"data.train_file={task_dir / 'train.jsonl'}", "eval.num_samples=0",
            "eval.compare_base=true", "eval.max_new_tokens=48", "eval.exact_greedy=false",
            "eval.batch_size=8",  # as the table's runs had it (batches change near ties)
            f"output.run_dir={run}", *RECIPES[recipe], f"train.seed={seed}", *(extra or [])]  # fmt: skip


def eval_command(run: Path, test: Path) -> list[str]:
    """`lorasft eval` of a run on every record of a test split."""
    return [sys.executable, "-m", "lorasft", "eval", str(run), "--data", str(test),
            "--num-samples", str(sum(1 for _ in test.open(encoding="utf-8")))]  # fmt: skip


def run_one(task_dir: Path, metric: str, recipe: str, out: Path, max_steps: int | None,
            threads: int, seed: int = DEFAULT_SEED) -> dict:  # fmt: skip
    run = run_dir(out, task_dir.name, recipe, seed)
    timings = timing_files(run)
    if not timings["train"].is_file() and run.exists():
        shutil.rmtree(run)  # a training that did not finish: start it afresh
    cap = [f"train.max_steps={max_steps}"] if max_steps else []
    steps = {"train": train_command(task_dir, recipe, run, seed, cap),
             "eval": eval_command(run, task_dir / "test.jsonl")}  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for step, args in steps.items():
        if timings[step].is_file():  # this step finished before (a resumed sweep)
            continue
        start = time.perf_counter()
        done = subprocess.run(args, check=False, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return {
                "task": task_dir.name,
                "recipe": recipe,
                "seed": seed,
                "error": f"{step}: {done.stderr[-500:]}",
            }
        timings[step].write_text(f"{time.perf_counter() - start:.1f}\n")
    res = json.loads((run / "results.json").read_text(encoding="utf-8"))
    ev = json.loads((run / "eval_results.json").read_text(encoding="utf-8"))
    return {"task": task_dir.name, "recipe": recipe, "seed": seed, "metric": metric,
            "n": ev["tuned"]["generation"]["n"],
            "tuned": ev["tuned"]["generation"].get(metric), "base": ev["base"]["generation"].get(metric),
            "steps": res["train"]["global_step"], "best_step": res["train"]["best_step"],
            "precision": res["train"]["precision"], "train_s": res["train"]["train_seconds"],
            "eval_s": ev["seconds"],
            "wall_s": sum(float(t.read_text()) for t in timings.values())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out/sweep")
    ap.add_argument("--tasks", nargs="*", choices=list(TASKS), help=f"default: {' '.join(SWEPT)}")
    ap.add_argument("--recipes", nargs="*", choices=list(RECIPES), help="default: all")
    ap.add_argument("--max-steps", type=int, help="cap every run (a quick check of the sweep)")
    ap.add_argument("--seeds", nargs="*", type=int,
                    help=f"train.seed values, default {DEFAULT_SEED}; a cell is their mean")  # fmt: skip
    ap.add_argument("--parallel", type=int, default=1,
                    help="runs at once, the CPU's cores shared out as OMP threads")  # fmt: skip
    ap.add_argument("--report-only", action="store_true",
                    help="train and score nothing: the table of the runs among these that finished")  # fmt: skip
    ap.add_argument("--rows", nargs="+", type=Path, metavar="FILE",
                    help="run nothing: the table of the rows saved in these sweep.json files")  # fmt: skip
    a = ap.parse_args()
    if a.rows:
        rows = saved_rows(a.rows, a.tasks, a.recipes, a.seeds)
        report(rows, defaults_by_task(rows))
        return
    a.tasks, a.recipes = a.tasks or SWEPT, a.recipes or list(RECIPES)
    a.seeds = a.seeds or [DEFAULT_SEED]
    out = Path(a.out)
    write(out / "tasks")
    threads = max(1, len(os.sched_getaffinity(0)) // a.parallel)
    # Recipe by recipe (every task's row of a recipe before the next recipe), seed by seed: a
    # sweep cut short still compares whole recipes.
    jobs = [(t, r, s) for s in a.seeds for r in a.recipes for t in a.tasks]
    if a.report_only:
        jobs = [
            j for j in jobs if all(f.is_file() for f in timing_files(run_dir(out, *j)).values())
        ]

    def one(job: tuple[str, str, int]) -> dict:
        t, r, s = job
        try:
            row = run_one(out / "tasks" / t, TASKS[t][1], r, out, a.max_steps, threads, s)
        except Exception as e:  # noqa: BLE001 (one failed run is a row of the table, not the end)
            row = {"task": t, "recipe": r, "seed": s, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(a.parallel) as pool:
        rows = list(pool.map(one, jobs))
    save_rows(out / "sweep.json", rows)
    report(rows, defaults_by_task(rows))


def _run_key(row: dict) -> tuple[str, str, int]:
    return row["task"], row["recipe"], row["seed"]


def save_rows(path: Path, rows: list[dict]) -> None:
    """Add `rows` to the sweep's file, replacing earlier rows of the same task, recipe and seed:
    a second invocation into the same --out keeps the first one's rows."""
    new = {_run_key(r) for r in rows}
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    kept = [r for r in old if _run_key(r) not in new]
    path.write_text(json.dumps(kept + rows, indent=1) + "\n", encoding="utf-8")


def saved_rows(files: list[Path], tasks: list[str] | None, recipes: list[str] | None,
               seeds: list[int] | None) -> list[dict]:  # fmt: skip
    """The rows of saved sweeps, those of the tasks, recipes and seeds named (all when not)."""
    rows = [r for f in files for r in json.loads(f.read_text(encoding="utf-8"))]
    return [r for r in rows if (not tasks or r["task"] in tasks)
            and (not recipes or r["recipe"] in recipes) and (not seeds or r["seed"] in seeds)]  # fmt: skip


def report(rows: list[dict], ran: dict[str, str] | None = None) -> None:
    """One markdown table: each recipe's score per task (the mean over its seeds) and its share of
    that task's best, its worst share over the tasks (what the choice maximises; ties go to the
    higher mean share), and its training time summed over them (training only, the mean over
    seeds: the first recipe on a task also pays the base's evaluation, which the others take
    from the cache). Then the row of lorasft's defaults: on each task the recipe they run there
    (`ran`, by task; CHOSEN where not named)."""
    ok = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            print(f"FAILED {r['task']} {r['recipe']} seed {r.get('seed')}: {r['error'][-300:]!r}")
    tasks = list(dict.fromkeys(r["task"] for r in ok))
    recipes = list(dict.fromkeys(r["recipe"] for r in ok))
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in ok:
        runs.setdefault((r["recipe"], r["task"]), []).append(r)
    mean = {k: sum(r["tuned"] for r in v) / len(v) for k, v in runs.items()}
    best = {t: max(m for (_, task), m in mean.items() if task == t) for t in tasks}
    metric = {r["task"]: f"{r['metric']}, n={r.get('n', '?')}" for r in ok}
    print("precision of the runs:", ", ".join(sorted({r.get("precision") or "?" for r in ok})))
    head = " | ".join(f"{t} ({metric[t]})" for t in tasks)
    print(f"\n| recipe | {head} | worst share | mean share | train min |")
    print("|---" * (len(tasks) + 4) + "|")
    base = " | ".join(_num(next(r.get("base") for r in ok if r["task"] == t)) for t in tasks)
    print(f"| base model | {base} | | | |")
    for rec in recipes:
        cells, worst, avg = _row({t: rec for t in tasks}, runs, mean, best, named=False)
        mine = [v for (x, _), v in runs.items() if x == rec]
        times = [[r.get("train_s") for r in v] for v in mine]  # None: a row without its time
        known = all(None not in t for t in times)
        train = sum(sum(t) / len(t) for t in times) / 60 if known else None
        mark = {CHOSEN: " (chosen)", CHOSEN_HAN: " (chosen for Chinese answers)"}.get(rec, "")
        print(f"| `{rec}`{mark} | {cells} | {worst} | {avg} | {_num(train, 0)} |")
    ran = {t: (ran or {}).get(t, CHOSEN) for t in tasks}
    cells, worst, avg = _row(ran, runs, mean, best, named=True)
    print(f"| **lorasft's defaults** (by answer language) | {cells} | {worst} | {avg} | |")
    spread(runs, mean, tasks, ran)


def _row(picks: dict[str, str], runs: dict[tuple[str, str], list[dict]],
         mean: dict[tuple[str, str], float], best: dict[str, float],
         named: bool) -> tuple[str, str, str]:  # fmt: skip
    """A table row's task cells (`picks`: the recipe scored on each task, its name shown when
    `named`), worst share and mean share ("incomplete" where a task has no cell)."""
    shares = [mean[rec, t] / best[t] if (rec, t) in mean and best[t] else None
              for t, rec in picks.items()]  # fmt: skip
    cells = " | ".join((f"`{rec}`: " if named else "")
                       + _cell(runs.get((rec, t), []), mean.get((rec, t)), sh)
                       for (t, rec), sh in zip(picks.items(), shares))  # fmt: skip
    if any(sh is None for sh in shares):
        return cells, "incomplete", ""
    return cells, f"{min(shares):.0%}", f"{sum(shares) / len(shares):.0%}"


SE_TARGET = 0.025
"""A share's standard error at which 95% and 90% are two errors apart."""


def spread(runs: dict[tuple[str, str], list[dict]], mean: dict[tuple[str, str], float],
           tasks: list[str], ran: dict[str, str]) -> None:  # fmt: skip
    """Where the recipe the defaults run on a task (`ran`) trails its best and both have several
    seeds: how far the seeds' scores spread (sample standard deviation), and how many seeds each
    recipe would need for that share of the best to have a standard error of SE_TARGET (delta
    method: var(share) = (var_chosen + share^2 var_best) / (seeds * best^2)). `mean`: report's
    cells."""
    lines = []
    for t in tasks:
        top = max((rec for rec, task in mean if task == t), key=lambda rec: mean[rec, t])
        mine = [r["tuned"] for r in runs.get((ran[t], t), [])]
        best = [r["tuned"] for r in runs[top, t]]
        if mean.get((ran[t], t), 0) >= mean[top, t] or len(mine) < 2 or len(best) < 2:
            continue
        share = mean[ran[t], t] / mean[top, t]
        sd_c, sd_b = statistics.stdev(mine), statistics.stdev(best)
        need = (sd_c**2 + share**2 * sd_b**2) / (mean[top, t] * SE_TARGET) ** 2
        lines.append(f"| {t} | `{ran[t]}` | `{top}` | {share:.1%} | {sd_c:.1f} ({len(mine)}) | "
                     f"{sd_b:.1f} ({len(best)}) | {need:.0f} |")  # fmt: skip
    if lines:
        print(f"\n| task | the defaults' recipe | best | its share | its seeds' sd (seeds) | the "
              f"best's sd (seeds) | seeds each for a share's error of {SE_TARGET:.1%} |")  # fmt: skip
        print("|---" * 7 + "|")
        print("\n".join(lines))


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(runs: list[dict], mean: float | None, share: float | None) -> str:
    """`mean (share)`, and with several seeds their scores: `13.9 (95%; 13.5/15.4/12.8)`."""
    if mean is None or share is None:
        return "-"
    seeds = "; " + "/".join(f"{r['tuned']:.1f}" for r in runs) if len(runs) > 1 else ""
    return f"{mean:.1f} ({share:.0%}{seeds})"


if __name__ == "__main__":
    main()
