"""Each LoRA variant through the rest of a run's life on the default model: a finished run of the
sweep (trained and evaluated by `bench/defaults/recipe_sweep.py`, so trained, reopened and
scored already) merged, exported to GGUF, and served, each form checked by `lorasft verify`
against the run's own answers:

- merged: `lorasft merge RUN --out` read by transformers;
- GGUF f16: `lorasft export --type f16`, read by transformers and run in llama.cpp;
- served: `lorasft serve --adapter NAME=RUN` (the default engine: llama.cpp where it is
  installed, which takes a LoRA as a GGUF LoRA, or the merged model where a GGUF LoRA cannot
  hold the adapter, as DoRA's magnitudes), then `verify --url`.

Per run and form: prompts answered with the same tokens / parting at a near tie / differing,
and verify's exit status. Prints a markdown table and writes it as JSON.

    python bench/adapters/variant_lifecycle.py RUN [RUN ...] [--out bench-out/lifecycle]
                                              [--num-prompts 8]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from serve_load import start_server

from lorasft.cli import main as lorasft


def check(run: Path, n: int, **targets) -> dict:
    from lorasft.export.verify import check_run

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        report = check_run(str(run), targets.get("merged"), targets.get("gguf"),
                           targets.get("url"), None, targets.get("server_model"), 48, n,
                           targets.get("llama_cpp"), None)  # fmt: skip
    return {"ok": report.ok, "targets": report.tally(), "problems": report.problems}


def lifecycle(run: Path, out: Path, n: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    merged, gguf = out / "merged", out / "model-f16.gguf"
    row: dict = {"run": run.name, "lora": json.loads((run / "adapter_config.json").read_text())}
    start = time.perf_counter()
    if not merged.is_dir():
        assert lorasft(["merge", str(run), "--out", str(merged)]) == 0, f"merge {run}"
    if not gguf.is_file():
        assert lorasft(["export", str(run), "--out", str(gguf), "--type", "f16"]) == 0
    row["files"] = check(run, n, merged=str(merged), gguf=str(gguf), llama_cpp=[str(gguf)])
    proc, url = start_server(["lorasft", "serve", "--adapter", f"v={run}"])
    try:
        from lorasft.export.verify import server_engine

        row["served_by"] = dict(zip(("engine", "weights"), server_engine(url)))
        row["served"] = check(run, n, url=url, server_model="v")
    finally:
        proc.terminate()
        proc.wait(30)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def variant(lora: dict) -> str:
    """The saved adapter (PiSSA/OLoRA runs save a plain LoRA of rank 2r; LoRA+ trains only)."""
    return ", ".join([f"r {lora['r']}", *(k for k in ("use_dora", "use_rslora") if lora.get(k))])


def cell(c: dict | None) -> str:
    return "—" if c is None else f"{c['same']}/{c['near_tie']}/{c['differ']}"


def table(rows: list[dict]) -> str:
    head = ("| run | adapter as saved | merged | GGUF f16 (transformers) | GGUF f16 (llama.cpp) "
            "| served (engine, weights) | all ok |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        files = r["files"]["targets"]
        lc = next((v for k, v in files.items() if k.startswith("llama.cpp")), None)
        served = r["served"]["targets"].get("server")
        engine = f"{r['served_by']['engine']}, {r['served_by']['weights']}"
        ok = r["files"]["ok"] and r["served"]["ok"]
        lines.append(f"| {r['run']} | {variant(r['lora'])} | {cell(files.get('merged'))} | "
                     f"{cell(files.get('gguf'))} | "
                     f"{cell(lc)} | {cell(served)} ({engine}) | {'yes' if ok else 'NO'} |")  # fmt: skip
    lines.append("\neach cell: prompts answered with the same tokens / parting at a near tie / "
                 "differing")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench-out/lifecycle"))
    ap.add_argument("--num-prompts", type=int, default=8)
    a = ap.parse_args()
    rows = [lifecycle(run, a.out / run.name, a.num_prompts) for run in a.runs]
    print(table(rows))
    (a.out / "lifecycle.json").write_text(json.dumps(rows, indent=1))
    print(f"rows: {a.out / 'lifecycle.json'}")


if __name__ == "__main__":
    main()
