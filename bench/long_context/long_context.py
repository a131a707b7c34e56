"""Context extension without training on the default model (SmolLM2-135M, window 8192).

Sliding-window perplexity at 4k, 8k and 16k tokens for RoPE scaling `none` (plain extrapolation),
`linear` (position interpolation), `dynamic` (dynamic NTK) and `yarn`, each applied to the base
through lorasft's context settings with no training; then passkey accuracy at 8k and 16k for the
method with the lowest perplexity at the longest length. Prints figures, wall and CPU time.

Text: the long text lorasft ships, then the Python documentation topics that every CPython
install carries (`pydoc_data`), joined with EOS: about 110k tokens, nothing downloaded.
Slow on 2 CPU cores (16k-token forward passes); smoke test with small lengths:

    python bench/long_context/long_context.py --lengths 256 512 --passkey-lengths 512 --trials 1 --max-windows 1
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from lorasft.config import load_config
from lorasft.eval.long_data import read_documents, token_stream
from lorasft.eval.long_models import load_base_on, window_and_plan
from lorasft.eval.passkey import passkey_grid
from lorasft.eval.sliding import sliding_perplexity
from lorasft.model.load import load_tokenizer, resolve_model_path

METHODS = ("none", "linear", "dynamic", "yarn")


def documents() -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return read_documents(None) + [topics[k] for k in sorted(topics)]


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def method_row(method: str, target: int, ids: list[int], args) -> dict:
    cfg = load_config(None, [f"context.target_length={target}", f"context.method={method}"])
    model = load_base_on(cfg, torch.float32, scaled=True)
    row = {}
    for n in args.lengths:
        res, wall, cpu = timed(
            sliding_perplexity, model, ids, n, args.stride or n // 2, args.max_windows
        )
        row[n] = {**res, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        print(f"  {method:8s} {n:6d} tokens: ppl {res.get('perplexity')}  ({wall:.0f}s wall, {cpu:.0f}s CPU)",
              flush=True)  # fmt: skip
    del model
    gc.collect()
    return row


def print_table(rows: dict[str, dict], lengths: list[int], original: int, target: int) -> None:
    print(f"\nperplexity by length, no training (window {original}, scaled to {target}):")
    print(f"{'method':10s}" + "".join(f"{n:>12d}" for n in lengths))
    for m, row in rows.items():
        cells = [row[n].get("perplexity") for n in lengths]
        print(f"{m:10s}" + "".join(f"{c:12.2f}" if c else f"{'—':>12s}" for c in cells))
    base = rows.get("none")
    if base:
        print("ratio to `none` (lower is better):")
        for m, row in rows.items():
            ratios = [
                (row[n].get("perplexity") or 0) / (base[n].get("perplexity") or 1) for n in lengths
            ]
            print(f"{m:10s}" + "".join(f"{r:12.3f}" for r in ratios))


def best_method(rows: dict[str, dict], length: int) -> str:
    scored = {m: r[length]["perplexity"] for m, r in rows.items() if r[length].get("perplexity")}
    return min(scored, key=scored.get)


def passkey(method: str, target: int, args) -> None:
    cfg = load_config(None, [f"context.target_length={target}", f"context.method={method}"])
    tok = load_tokenizer(resolve_model_path(cfg.model.path))
    model = load_base_on(cfg, torch.float32, scaled=True)
    grid, wall, cpu = timed(
        passkey_grid, model, tok, args.passkey_lengths, args.depths, args.trials
    )
    print(
        f"\npasskey accuracy, {method} untrained ({args.trials} trials per cell; {wall:.0f}s wall, {cpu:.0f}s CPU):"
    )
    print(f"{'length':>8s}" + "".join(f"{d:>8.0%}" for d in args.depths))
    for n, row in zip(grid["lengths"], grid["accuracy"]):
        print(f"{n:8d}" + "".join(f"{a:8.0%}" for a in row))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    p.add_argument(
        "--target", type=int, help="length the scaling is set for (default: 2x the window)"
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--stride", type=int, help="default: half of each length")
    p.add_argument("--max-windows", type=int, default=2)
    p.add_argument("--passkey-lengths", nargs="+", type=int, default=[8192, 16384])
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=2)
    args = p.parse_args()
    original, _ = window_and_plan(load_config(None, []))
    target = args.target or 2 * original
    tok = load_tokenizer(resolve_model_path("default"))
    ids = token_stream(documents(), tok)
    print(
        f"default model, window {original}; {len(ids)} tokens of text; {torch.get_num_threads()} threads"
    )
    start = time.process_time()
    rows = {m: method_row(m, target, ids, args) for m in args.methods}
    print_table(rows, args.lengths, original, target)
    best = best_method(rows, max(args.lengths))
    print(f"\nlowest perplexity at {max(args.lengths)} tokens: {best}")
    passkey(best, target, args)
    print(f"\ntotal CPU time {time.process_time() - start:.0f}s")


if __name__ == "__main__":
    main()
