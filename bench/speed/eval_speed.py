"""The evaluation that ends a run, timed four ways on a finished run (default: the demo's 32
eval records, base and tuned): one sample at a time (batch size 1), batched (eval.batch_size),
batched with the base's side taken from the cache a first batched evaluation filled, and batched
without the near-tie check nor row-wise attention (eval.exact_greedy=false). Prints the seconds
and how many greedy answers are equal to the one-at-a-time ones, and in how many exact batches
the first decoding step computed as alone (then no row is generated again); then, for batches
that also read the prompts together (row-wise attention; what exact batches did before they read
each prompt alone), which answers that changes before the near-tie check and the closest call
on each row's path (the evidence for `NEAR_TIE_EPS`), and that path's best case: its batches
plus generating alone only the answers they really change. Figures only.

    python bench/speed/eval_speed.py [--run bench-out/demo-run] [--batch-size 8] [--dtype float32]
    python bench/speed/eval_speed.py --sizes 8 16 32 [--rounds 2] [--run ...] [--dtype ...]

`--sizes` instead times the whole evaluation (perplexity and answers, base computed) one at a time
once, then at each batch size in turn, `--rounds` times over (interleaved, so a change in the
machine's speed touches every size alike): what eval.batch_size's default was chosen by.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from serve_load import cpu_name


def timed_eval(run, cfg, examples, encoded, **changes) -> tuple[float, dict]:
    from lorasft.eval.evaluate import evaluate

    ev = cfg.eval.model_copy(update=changes)
    start = time.perf_counter()
    out = evaluate(run.model, run.tok, examples, encoded, ev)
    return time.perf_counter() - start, out


def answers(out: dict) -> list[tuple[str, str]]:
    return [(s["tuned"], s.get("base")) for s in out["samples"]]


def equal(a: dict, b: dict) -> int:
    """How many samples two evaluations answered alike (tuned and base)."""
    return sum(x == y for x, y in zip(answers(a), answers(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="bench-out/demo-run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="open the run in this dtype")
    ap.add_argument("--sizes", type=int, nargs="+", help="compare these eval batch sizes")
    ap.add_argument("--rounds", type=int, default=2, help="with --sizes: times over each size")
    a = ap.parse_args()
    from lorasft.data.prepare import eval_set
    from lorasft.model.reopen import open_run

    run = open_run(a.run, a.dtype)
    examples, encoded = eval_set(run.cfg.data, run.tok)
    if a.sizes:
        return compare_sizes(run, examples, encoded, a.sizes, a.rounds)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LORASFT_CACHE"] = cache  # an empty eval cache (the model is already open)
        one, out1 = timed_eval(run, run.cfg, examples, encoded, batch_size=1, cache_base=False)
        batched, out8 = timed_eval(run, run.cfg, examples, encoded, batch_size=a.batch_size)
        cached, outc = timed_eval(run, run.cfg, examples, encoded, batch_size=a.batch_size)
        plain, outp = timed_eval(run, run.cfg, examples, encoded, batch_size=a.batch_size,
                                 exact_greedy=False, cache_base=False)  # fmt: skip
    assert outc["base_from_cache"] and not out8["base_from_cache"]
    n = len(out1["samples"])
    same_8 = equal(out1, out8)
    same_c = equal(out8, outc)
    same_p = equal(out1, outp)
    cpu = cpu_name()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs; run {a.run} in {run.spec.dtype}; {n} samples, base and tuned, "
          f"max_new_tokens {run.cfg.eval.max_new_tokens}")  # fmt: skip
    print(f"one at a time (batch 1):       {one:6.1f} s")
    print(f"batched ({a.batch_size}):                   {batched:6.1f} s  x{one / batched:.2f}")
    print(f"batched, base from the cache:  {cached:6.1f} s  x{one / cached:.2f}")
    print(f"batched, exact_greedy=false:   {plain:6.1f} s  x{one / plain:.2f}  "
          f"(answers equal to one at a time: {same_p}/{n})")  # fmt: skip
    print(f"answers (tuned, base) equal: batched vs one at a time {same_8}/{n}; "
          f"cached vs batched {same_c}/{n}; rows generated again alone (near ties): "
          f"{out8['generation_redone_alone']} of {2 * n}; batches whose decoding computed as "
          f"alone: {out8['generation_batches_as_alone']}")  # fmt: skip
    batched_only, alone = near_tie_study(run, examples, out1, a.batch_size)
    floor = batched_only + alone
    print(f"best case of batches reading the prompts together: no near-tie check + only the "
          f"answers they change generated alone: {batched_only:.1f} + {alone:.1f} = {floor:.1f} s  "
          f"x{one / floor:.2f}")  # fmt: skip


def compare_sizes(run, examples, encoded, sizes: list[int], rounds: int) -> None:
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; run {run.spec.dtype}; whole evaluation "
          f"(perplexity and answers, base and tuned, base computed)")  # fmt: skip
    one, ref = timed_eval(run, run.cfg, examples, encoded, batch_size=1, cache_base=False)
    print(f"one at a time: {one:6.1f} s")
    for r in range(rounds):
        for size in sizes:
            s, out = timed_eval(run, run.cfg, examples, encoded, batch_size=size, cache_base=False)
            same = equal(ref, out)
            print(f"round {r + 1}, batches of {size:2d}: {s:6.1f} s  x{one / s:.2f}  answers equal "
                  f"to one at a time {same}/{len(out['samples'])}, redone alone "
                  f"{out['generation_redone_alone']}", flush=True)  # fmt: skip


def near_tie_study(run, examples, out1: dict, batch_size: int) -> tuple[float, float]:
    """Batched answers as exact batching computed them before it read each prompt alone (the
    prompts read together, row-wise attention), without the near-tie check, against the
    one-at-a-time ones, and the closest call on each row's batched path
    (`eval.generate._Margins` units). Returns the seconds of those batches and the seconds it
    takes to generate alone the answers that changed."""
    from lorasft.eval import generate as gen_mod
    from lorasft.eval.evaluate import chat_samples

    _, prompts, _ = chat_samples(examples, run.cfg.eval.num_samples)
    gen = gen_mod.GenSettings.from_config(
        run.cfg.eval.model_copy(update={"batch_size": batch_size, "exact_greedy": False})
    )
    batched_s = alone_s = 0.0
    # margins are recorded with the check off too
    for side, base in (("tuned", False), ("base", True)):
        stats: dict = {}
        # the attention exact batches run (`_rowwise_sdpa`), without generating near ties again
        start = time.perf_counter()
        with gen_mod._padding_free_attention(run.model, replace(gen, exact=True)):
            plain = gen_mod.generate(run.model, run.tok, prompts, gen, base=base, stats=stats)
        batched_s += time.perf_counter() - start
        ref = [s[side] for s in out1["samples"]]
        parted = [i for i, (x, y) in enumerate(zip(plain, ref)) if x != y]
        margins = [m for m in stats["margins"] if m is not None]  # None: a batch of one
        print(
            f"{side}: prompts read together (row-wise attention), no near-tie check: parts "
            f"from one at a time on {len(parted)}/{len(ref)}; "
            f"their closest calls (eps units): {[stats['margins'][i] for i in parted]}"
        )
        print(
            f"  rows whose closest call is below k units, k = 1/2/4/8/16: "
            f"{[sum(m < k for m in margins) for k in (1, 2, 4, 8, 16)]} of {len(margins)}"
        )
        start = time.perf_counter()
        again = gen_mod.generate(run.model, run.tok, [prompts[i] for i in parted],
                                 replace(gen, batch_size=1), base=base)  # fmt: skip
        alone_s += time.perf_counter() - start
        assert again == [ref[i] for i in parted]  # alone, as one at a time
    return batched_s, alone_s


if __name__ == "__main__":
    main()
