"""results.json and samples.md in the run folder (fields documented in docs/run-folder.md)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lorasft.run_files import write_json

PACKAGES = ("lorasft", "torch", "transformers", "peft", "accelerate", "datasets")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_results(path: Path, results: dict[str, Any]) -> Path:
    """Whole, then renamed into place: `lorasft ui` and `lorasft runs` read it while it is written."""
    return write_json(path, results)


def _cell(text: str | None) -> str:
    return "—" if text is None else "`" + text.replace("`", "'").replace("\n", " ⏎ ") + "`"


def write_samples(path: Path, rows: list[dict[str, Any]]) -> Path:
    lines = ["# Samples: base vs tuned", ""]
    for i, r in enumerate(rows, 1):
        lines += [f"## {i}. {r['source']}", "", "**Instruction**", "", "```", r["prompt"], "```", "",
                  f"- reference: {_cell(r['reference'])}",
                  f"- base: {_cell(r.get('base'))}",
                  f"- tuned: {_cell(r['tuned'])}", ""]  # fmt: skip
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
