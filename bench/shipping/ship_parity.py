"""Ship-it parity on the default model: does every shipped form answer like the run did in training?

For each precision: train the built-in demo, reopen it (`lorasft eval`), merge, export GGUF f32 /
f16 / q8_0, then `lorasft verify` the merged folder and the f32 file through transformers, all
three files through llama.cpp itself, and a live `lorasft serve` on each engine (transformers;
llama.cpp with the adapter as a GGUF LoRA, where llama-server is installed). Prints one table; docs/shipping.md's
"Ship it" figures come from it.

    python bench/shipping/ship_parity.py [--precisions auto fp32] [--out /tmp/lorasft-ship]
                                [--num-prompts 16] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from serve_load import start_server

from lorasft.cli import main
from lorasft.serve.llamacpp_engine import find_llama_server

TYPES = ("f32", "f16", "q8_0")


def quiet(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def timed(argv: list[str]) -> tuple[int, str, float]:
    start = time.perf_counter()
    rc, out = quiet(argv)
    return rc, out, time.perf_counter() - start


def train(run: Path, precision: str, samples: int) -> dict:
    args = ["train", f"train.precision={precision}", f"output.run_dir={run}",
            f"eval.num_samples={samples}", "eval.compare_base=false"]  # fmt: skip
    rc, _, secs = timed(args)
    assert rc == 0, "training failed"
    results = json.loads((run / "results.json").read_text())
    return {"seconds": secs, "results": results}


def reopened_answers(run: Path, samples: int) -> tuple[int, int]:
    """`lorasft eval` on the finished run: its greedy answers against the in-training ones."""
    rc, _ = quiet(["eval", str(run), "--num-samples", str(samples)])
    assert rc == 0
    before = json.loads((run / "results.json").read_text())["eval"]["samples"]
    after = json.loads((run / "eval_results.json").read_text())["samples"]
    return sum(a["tuned"] == b["tuned"] for a, b in zip(before, after)), len(before)


def agreement(out: str) -> dict[str, tuple[int, int, int]]:
    """target -> (agree, ties, prompts) from verify's table."""
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit() and parts[1] != "adapter":
            rows.setdefault(parts[1], []).append(parts[3] if parts[2] == "same" else "DIFFER")
    return {t: (v.count("same") + v.count("tie"), v.count("tie"), len(v)) for t, v in rows.items()}


@contextlib.contextmanager
def served(module: list[str]):
    """An OpenAI-compatible server (`python -m MODULE...`) until the block ends."""
    proc, url = start_server(module, wait=300)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ship(run: Path, n: int, new: int) -> dict[str, tuple[int, int, int]]:
    for d in [run / "merged", *(run / f"{t}.gguf" for t in TYPES)]:  # a rerun with --reuse
        subprocess.run(["rm", "-rf", str(d)], check=True)
    rc, _ = quiet(["merge", str(run), "--out", str(run / "merged")])
    assert rc == 0
    for t in TYPES:
        assert quiet(["export", str(run), "--out", str(run / f"{t}.gguf"), "--type", t])[0] == 0
    common = ["--num-prompts", str(n), "--max-new-tokens", str(new)]
    files = [str(run / f"{t}.gguf") for t in TYPES]
    _, out = quiet(["verify", str(run), "--merged", str(run / "merged"), "--gguf", files[0],
                    "--llama-cpp", *files, *common])  # fmt: skip
    (run / "verify.txt").write_text(out)
    found = agreement(out)
    served_run = ["--adapter", f"demo={run}"]
    servers = {
        "lorasft serve transformers": ["lorasft", "serve", "--engine", "transformers", *served_run]
    }
    if find_llama_server() is not None:  # the run's adapter as a GGUF LoRA on an f16 base
        servers["lorasft serve llama.cpp"] = [
            "lorasft",
            "serve",
            "--engine",
            "llama.cpp",
            *served_run,
        ]
    for name, cmd in servers.items():
        with served(cmd) as url:
            _, out = quiet(["verify", str(run), "--url", url, "--server-model", "demo", *common])
        (run / f"verify_{name.replace(' ', '_')}.txt").write_text(out)
        found[name] = agreement(out)["server"]
    return found


def main_(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", nargs="+", default=["auto", "fp32"])
    p.add_argument("--out", default="/tmp/lorasft-ship")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--reuse", action="store_true", help="reuse runs already trained in --out")
    a = p.parse_args(argv)
    rows = []
    for precision in a.precisions:
        run = Path(a.out) / precision
        if (run / "results.json").is_file() and a.reuse:
            trained = {"seconds": 0.0, "results": json.loads((run / "results.json").read_text())}
        elif run.exists():
            raise SystemExit(f"{run} exists; give another --out (or --reuse a finished run)")
        else:
            trained = train(run, precision, a.num_prompts)
        used = trained["results"]["train"]["precision"]
        same, total = reopened_answers(run, a.num_prompts)
        rows.append((precision, used, "reopened (lorasft eval)", f"{same}/{total}", ""))
        for target, (agree, ties, n) in ship(run, a.num_prompts, a.max_new_tokens).items():
            rows.append(
                (precision, used, target, f"{agree}/{n}", f"{ties} near ties" if ties else "")
            )
        print(f"[bench] {precision}: trained in {trained['seconds']:.0f} s ({used})", flush=True)
    cpu = re.sub(r"\s+", " ", os.popen("lscpu | grep 'Model name'").read().split(":")[-1]).strip()
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores; greedy, {a.max_new_tokens} new tokens")
    print(f"{'precision':<10} {'used':<5} {'target':<28} {'agree':>6}  note")
    for r in rows:
        print(f"{r[0]:<10} {r[1]:<5} {r[2]:<28} {r[3]:>6}  {r[4]}")


if __name__ == "__main__":
    main_()
