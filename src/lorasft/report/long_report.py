"""Evaluation by length, shown: ppl_by_length.png, passkey.png, attention_by_distance.png and
the console tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def ppl_plot(res: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in res["perplexity"].items():
        pts = [(int(n), v["perplexity"]) for n, v in row.items() if v.get("perplexity") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=res["labels"][name])
    ax.axvline(res["original_window"], color="grey", ls="--", label="original window")
    ax.set_xscale("log", base=2)
    ax.set_xticks(res["lengths"], [str(n) for n in res["lengths"]])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (sliding window)")
    ax.set_title("Perplexity by context length")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def passkey_plot(pk: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(1.2 * len(pk["depths"]) + 2.5, 0.6 * len(pk["lengths"]) + 2))
    im = ax.imshow(pk["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(pk["depths"])), [f"{d:.0%}" for d in pk["depths"]])
    ax.set_yticks(range(len(pk["lengths"])), [str(n) for n in pk["lengths"]])
    for i, row in enumerate(pk["accuracy"]):
        for j, acc in enumerate(row):
            ax.text(j, i, f"{acc:.0%}", ha="center", va="center", fontsize=9)
    ax.set_xlabel("depth of the key in the text")
    ax.set_ylabel("prompt length (tokens)")
    ax.set_title(f"Passkey accuracy ({pk['trials']} trials per cell)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def _band_label(lo: int, hi: int) -> str:
    return f"{lo}-{hi - 1}"


def attention_plot(att: dict[str, Any], path: Path) -> str:
    layers = att["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 3), 4.5))
    bottom = [0.0] * len(layers)
    for k, (lo, hi) in enumerate(att["bands"]):
        heights = [row["bands"][k] for row in layers]
        ax.bar(range(len(layers)), heights, bottom=bottom, label=f"distance {_band_label(lo, hi)}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.plot(range(len(layers)), [row["sink"] for row in layers], "k.-",
            label=f"on the first {att['n_sink']} tokens")  # fmt: skip
    ax.set_xticks(range(len(layers)))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of attention mass")
    ax.set_ylim(0, 1)
    ax.set_title(
        f"Attention by distance ({att['length']} tokens, queries from {att['first_query']})"
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def write_long_plots(res: dict[str, Any], out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [ppl_plot(res, out_dir / "ppl_by_length.png")]
    if res.get("passkey", {}).get("lengths"):
        names.append(passkey_plot(res["passkey"], out_dir / "passkey.png"))
    if res.get("attention"):
        names.append(attention_plot(res["attention"], out_dir / "attention_by_distance.png"))
    return names


def _fmt(v: dict[str, Any]) -> str:
    return "—" if v.get("perplexity") is None else f"{v['perplexity']:.2f}"


def print_long(res: dict[str, Any]) -> None:
    console = Console()
    t = Table(title=f"perplexity by length (window {res['original_window']}, target "
                    f"{res['target_length']}, method {res['method']})")  # fmt: skip
    t.add_column("model")
    for n in res["lengths"]:
        t.add_column(str(n), justify="right")
    for name, row in res["perplexity"].items():
        t.add_row(res["labels"][name], *[_fmt(row[str(n)]) for n in res["lengths"]])
    console.print(t)
    pk = res.get("passkey")
    if pk and pk["lengths"]:
        p = Table(title=f"passkey accuracy, tuned run ({pk['trials']} trials per cell)")
        p.add_column("length \\ depth")
        for d in pk["depths"]:
            p.add_column(f"{d:.0%}", justify="right")
        for n, row in zip(pk["lengths"], pk["accuracy"]):
            p.add_row(str(n), *[f"{a:.0%}" for a in row])
        console.print(p)
    if res.get("card"):
        from lorasft.eval.long_card import card_lines

        console.print("report card (did the run use the longer context?):")
        for line in card_lines(res["card"]):
            console.print(f"  {line}", highlight=False, markup=False)
    for name in res.get("plots", []):
        console.print(f"written: {name}")
