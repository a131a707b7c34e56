"""Does picking the checkpoint by the task's own metric (`train.metric_for_best_model`) instead of
the validation loss change what a recipe scores on a task's test split? (issue 13.) Trains one
recipe of `bench/defaults/recipe_sweep.py` on one task of `bench/defaults/recipe_tasks.py` with a checkpoint kept
at every evaluation (every --eval-steps steps), the task's metric computed on the whole
validation share at each and no early stopping; then scores every checkpoint on the test split.
Prints per checkpoint the validation loss, the validation metric and the test metric, and the
step each rule picks (the lowest validation loss, the highest validation metric; the first of
equals, as Trainer) with its test score. Resumable: a finished training or scoring is kept.

    python bench/defaults/checkpoint_curve.py --task country_chat --recipe attn-r16-lr1e-3 [--seed 42]
                                     [--eval-steps 10] [--out bench-out/checkpoints]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from recipe_sweep import RECIPES, eval_command, train_command  # the script's folder
from recipe_tasks import TASKS, write

from lorasft.train.checkpoints import complete_checkpoints


def train(task_dir: Path, metric: str, recipe: str, run: Path, seed: int, every: int) -> None:
    if (run / "results.json").is_file():
        return
    shutil.rmtree(run, ignore_errors=True)
    extra = [f"train.metric_for_best_model={metric}", "eval.num_samples=100000",
             f"train.eval_steps={every}", "train.save_total_limit=null",
             "train.early_stopping_patience=null"]  # fmt: skip
    subprocess.run(train_command(task_dir, recipe, run, seed, extra), check=True)


def curve(run: Path, metric: str) -> list[dict]:
    """Validation loss and metric at each evaluation, from the last checkpoint's trainer state."""
    last = complete_checkpoints(run)[-1]  # in step order
    state = json.loads((last / "trainer_state.json").read_text(encoding="utf-8"))
    return [{"step": h["step"], "val_loss": h["eval_loss"], "val": h[f"eval_{metric}"]}
            for h in state["log_history"] if "eval_loss" in h]  # fmt: skip


def score(run: Path, step: int, test: Path, metric: str, out: Path) -> float:
    """The test metric of checkpoint `step`: a copy of the run with that checkpoint's adapter."""
    copy = out / f"{run.name}--step{step}"
    if not (copy / "eval_results.json").is_file():
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
        adapter = run / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors"
        shutil.copy2(adapter, copy / "adapter_model.safetensors")
        subprocess.run(eval_command(copy, test), check=True, capture_output=True)
    ev = json.loads((copy / "eval_results.json").read_text(encoding="utf-8"))
    return ev["tuned"]["generation"][metric]


def picks(rows: list[dict]) -> tuple[dict, dict]:
    """The checkpoints Trainer would load: the lowest validation loss, the highest validation
    metric; of equals, the first (Trainer moves its best only on a strict improvement)."""
    return min(rows, key=lambda r: r["val_loss"]), max(rows, key=lambda r: r["val"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", required=True, choices=list(TASKS))
    ap.add_argument("--recipe", required=True, choices=list(RECIPES))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--eval-steps", type=int, default=10)
    ap.add_argument("--out", default="bench-out/checkpoints")
    a = ap.parse_args()
    out = Path(a.out)
    write(out / "tasks")
    task_dir, metric = out / "tasks" / a.task, TASKS[a.task][1]
    run = out / "runs" / f"{a.task}--{a.recipe}--seed{a.seed}--every{a.eval_steps}"
    train(task_dir, metric, a.recipe, run, a.seed, a.eval_steps)
    rows = curve(run, metric)
    for r in rows:
        r["test"] = score(run, r["step"], task_dir / "test.jsonl", metric, out / "scored")
    (out / f"{run.name}.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(f"\n{a.task} ({metric}), {a.recipe}, seed {a.seed}\n")
    print(f"| step | validation loss | validation {metric} | test {metric} |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['val_loss']:.3f} | {r['val']:.1f} | {r['test']:.1f} |")
    by_loss, by_metric = picks(rows)
    print(f"\npicked by validation loss: step {by_loss['step']}, test {by_loss['test']:.1f}")
    print(f"picked by validation {metric}: step {by_metric['step']}, test {by_metric['test']:.1f}")
    print(f"best on the test split: {max(r['test'] for r in rows):.1f}")


if __name__ == "__main__":
    main()
