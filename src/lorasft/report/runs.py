"""The runs in a folder and where each stands, for `lorasft runs` and `lorasft ui`.

A run folder holds config.yaml from its start, progress.json while it trains (rewritten at every
log by the trainer), and results.json once it finished. Status: `finished` (results.json),
`training` / `evaluating` (progress.json and its process alive), `stopped` (progress.json, the
process gone: killed or failed; `resume=auto` continues it), `starting` (only config.yaml, its
process alive or unknown)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorasft.report.html import METRICS, flat
from lorasft.run_files import CONFIG, PROGRESS, RESULTS, read_json


def is_run(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def find_runs(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (runs go to output.dir, default runs/)")
    return sorted((p for p in root.iterdir() if is_run(p)), key=lambda p: p.stat().st_mtime)


def progress_of(run_dir: Path) -> dict | None:
    """The newest progress.json of the run (a staged run's current stage included)."""
    found = [run_dir / PROGRESS, *run_dir.glob(f"stages/*/{PROGRESS}")]
    found = [p for p in found if p.is_file()]
    return read_json(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_summary(run_dir: Path) -> dict[str, Any]:
    """One row: name, status, steps, losses, metrics, time, settings (flat config)."""
    row: dict[str, Any] = {"name": run_dir.name, "path": str(run_dir), "status": "starting"}
    res = read_json(run_dir / RESULTS)  # None until it is there whole
    if res is not None:
        train, ev = res.get("train") or {}, res.get("eval") or {}
        tuned = ev.get("tuned") or {}
        row.update(status="finished", step=train.get("global_step"),
                   max_steps=train.get("global_step"), best_eval_loss=train.get("best_metric"),
                   seconds=train.get("train_seconds"), settings=flat(res.get("config") or {}),
                   loss=_last(res.get("log_history") or [], "loss"),
                   eval_loss=(tuned.get("perplexity") or {}).get("loss"),
                   **{m: (tuned.get("generation") or {}).get(m) for m in METRICS})  # fmt: skip
        return row
    prog = progress_of(run_dir)
    if prog is not None:
        log = prog.get("log") or []
        status = prog["status"] if alive(prog.get("pid")) else "stopped"
        evals = [r["eval_loss"] for r in log if "eval_loss" in r]
        row.update(status=status, step=prog.get("step"), max_steps=prog.get("max_steps"),
                   eta_s=prog.get("eta_s"), tokens_per_s=prog.get("tokens_per_s"),
                   seconds=prog.get("elapsed_s"), loss=_last(log, "loss"),
                   best_eval_loss=min(evals) if evals else None)  # fmt: skip
    try:
        from lorasft.config import load_config

        row["settings"] = flat(load_config(run_dir / CONFIG).model_dump(mode="json"))
    except Exception:  # noqa: BLE001 (a config from another version: the row still shows)
        row["settings"] = {}
    return row


def _last(log: list[dict], key: str):
    values = [r[key] for r in log if key in r]
    return values[-1] if values else None


def differing(rows: list[dict]) -> list[str]:
    """Settings whose values differ between the runs (the run folder names left out)."""
    keys = sorted({k for r in rows for k in r.get("settings", {})})
    return [k for k in keys if not k.startswith("output.")
            and len({json.dumps(r.get("settings", {}).get(k)) for r in rows}) > 1]  # fmt: skip


def runs_table(root: str | Path) -> tuple[list[dict], list[str]]:
    rows = [run_summary(p) for p in find_runs(root)]
    return rows, differing(rows)


def _fmt(v, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def render_runs(rows: list[dict], keys: list[str]) -> str:
    head = ["run", "status", "steps", "best eval loss", *METRICS, "time s", *keys]
    lines = [head]
    for r in rows:
        steps = (
            f"{_fmt(r.get('step'))}/{_fmt(r.get('max_steps'))}"
            if r.get("step") is not None
            else "—"
        )
        lines.append([r["name"], r["status"], steps, _fmt(r.get("best_eval_loss")),
                      *(_fmt(r.get(m), ".2f") for m in METRICS), _fmt(r.get("seconds"), ".0f"),
                      *(_fmt(r.get("settings", {}).get(k)) for k in keys)])  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines
    )
