"""loss_curve.png: train and eval loss on one step axis, best step marked, overfitting shaded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import font_manager

CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC", "Source Han Sans SC")  # fmt: skip


def cjk_font() -> str | None:
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((f for f in CJK_FONTS if f in installed), None)


def _use_font_for(labels: list[str]) -> None:
    """Pick a CJK-capable font when a label needs one (DejaVu draws CJK as empty boxes)."""
    if any(CJK.search(s) for s in labels):
        font = cjk_font()
        if font:
            plt.rcParams["font.family"] = [font, "DejaVu Sans"]
            plt.rcParams["axes.unicode_minus"] = False


def loss_curve(train: list[tuple[int, float]], evals: list[tuple[int, float]], verdict: dict[str, Any],
               path: Path, title: str = "Loss") -> Path:  # fmt: skip
    _use_font_for([title])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), label="eval loss (response tokens)", color="tab:red", marker="o")
    if verdict.get("best_step") is not None:
        ax.axvline(verdict["best_step"], color="tab:green", ls="--",
                   label=f"best step {verdict['best_step']}")  # fmt: skip
    if verdict.get("region"):
        lo, hi = verdict["region"]
        ax.axvspan(lo, hi, color="tab:red", alpha=0.12, label="overfitting")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
