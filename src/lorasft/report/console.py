"""The base-vs-tuned table printed at the end of a run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(v: Any) -> str:
    return "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def comparison_table(ev: dict[str, Any]) -> Table:
    table = Table(title="base vs tuned (eval set)")
    table.add_column("metric")
    sides = [s for s in ("base", "tuned") if s in ev]
    for s in sides:
        table.add_column(s, justify="right")
    rows = [("loss (response tokens)", "perplexity", "loss"),
            ("perplexity", "perplexity", "perplexity")]  # fmt: skip
    rows += [(f"{m} (%)", "generation", m) for m in ("exact_match", "rouge_l", "chrf")]
    for label, group, key in rows:
        table.add_row(label, *[_fmt(ev[s].get(group, {}).get(key)) for s in sides])
    return table


def print_summary(ev: dict[str, Any], verdict: dict[str, Any], run_dir: str) -> None:
    console = Console()
    console.print(comparison_table(ev))
    console.print(f"overfitting: {'YES' if verdict['overfitting'] else 'no'} ({verdict['reason']})")
    if verdict.get("best_step") is not None:
        console.print(
            f"best step {verdict['best_step']} (eval loss {verdict['best_eval_loss']:.4f})"
        )
    if "seconds" in ev:
        cached = " (base answers from the cache)" if ev.get("base_from_cache") else ""
        console.print(f"evaluation: {ev['seconds']:.1f} s{cached}")
    console.print(f"run folder: {run_dir}")
