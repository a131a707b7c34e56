"""The overfitting verdict: eval loss rising K evaluations in a row while train loss falls.

(The design document flags three *falling* eval losses as overfitting; that is learning.)
"""

from __future__ import annotations

import itertools
from typing import Any


def split_logs(
    log_history: list[dict[str, Any]],
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(int(h["step"]), float(h["loss"])) for h in log_history if "loss" in h and "step" in h]
    evals = [(int(h["step"]), float(h["eval_loss"])) for h in log_history if "eval_loss" in h]
    return train, evals


def _train_loss_near(train: list[tuple[int, float]], lo: int, hi: int) -> float | None:
    """Mean logged train loss with step in (lo, hi]: the training between two evaluations."""
    vals = [loss for step, loss in train if lo < step <= hi]
    return sum(vals) / len(vals) if vals else None


def verdict(log_history: list[dict[str, Any]], patience: int = 3) -> dict[str, Any]:
    train, evals = split_logs(log_history)
    out: dict[str, Any] = {"overfitting": False, "patience": patience, "region": None,
                           "best_step": None, "best_eval_loss": None, "evaluations": len(evals)}  # fmt: skip
    if not evals:
        out["reason"] = "no evaluations logged"
        return out
    best_step, best = min(evals, key=lambda e: (e[1], e[0]))
    out.update(best_step=best_step, best_eval_loss=best)
    for end in range(patience, len(evals)):
        window = evals[end - patience : end + 1]
        rising = all(b[1] > a[1] for a, b in itertools.pairwise(window))
        first_step, last_step = window[0][0], window[-1][0]
        before = _train_loss_near(train, -1, first_step)
        after = _train_loss_near(train, window[-2][0], last_step)
        if rising and before is not None and after is not None and after < before:
            out.update(overfitting=True, region=[first_step, last_step])
            out["reason"] = (f"eval loss rose {patience} evaluations in a row (steps {first_step}"
                             f"-{last_step}) while train loss fell {before:.4f} -> {after:.4f}")  # fmt: skip
            return out
    out["reason"] = f"eval loss did not rise {patience} evaluations in a row while train loss fell"
    return out
