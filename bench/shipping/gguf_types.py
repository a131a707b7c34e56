"""What each GGUF type costs a run's answers in llama.cpp, and the bound `verify` allows it
(issue 33): a finished run (the demo) exported as every type of `lorasft export --type`, each
file run in llama.cpp itself on the run's first eval prompts.

Per type: the file's size; `lorasft verify --llama-cpp`'s verdict (answers equal token for token,
near ties, differences); and how far the type's rounding moves the margins the run decides by:
at every position of the run's own greedy answers (teacher-forced in llama.cpp), the change of
the run's margin (its first choice over its second), run's logits against llama.cpp's.
Shifts are also given as shares of the run's largest |logit| at the position, the unit of the
bounds below 8 bits (ROUNDING_SHARE in src/lorasft/export/verify.py). A divergence whose run
margin lies within the shift is one the file's rounding explains, so each type's bound must lie
above the largest shift measured. Control: the untrained base written as if it were the run
(f32), judged with each type's bound: the prompts where it still DIFFERs (a bound that excused
all of them would pass another model).

    python bench/shipping/gguf_types.py RUN [--out DIR] [--num-prompts 16] [--max-new-tokens 48]
                                   [--types f32 f16 q8_0 q4_0 q4_k_m q5_k_m q6_k]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from lorasft.export import GGUF_TYPES
from lorasft.export.gguf import export_gguf, write_gguf
from lorasft.export.llamacpp_verify import LlamaCpp
from lorasft.export.verify import (
    VERDICTS,
    check_prompt_ids,
    describe_rounding,
    greedy,
    load_reference,
    prompt_set,
    verify,
)
from lorasft.model.load import load_model

RUNNERS_UP = 1  # the run's second choice: the token a target's rounding would pick instead


def answers(ref, prompts: list, max_new_tokens: int) -> list[tuple[int, list[int], np.ndarray]]:
    """Per prompt: its length, the prompt with the run's greedy answer, the run's logits."""
    out = []
    for messages in prompts:
        ids = check_prompt_ids(messages, ref.tok)
        seq = ids + greedy(ref, ids, max_new_tokens)
        with torch.no_grad():
            ours = ref.model(input_ids=torch.tensor([seq])).logits[0].float().numpy()
        out.append((len(ids), seq, ours))
    return out


def shifts(lc: LlamaCpp, answered: list) -> list[tuple[float, float]]:
    """At every answer position: the change, run -> llama.cpp, of the run's margin (the gap
    between its token and its next RUNNERS_UP choices, the largest change); and that change over
    the run's largest |logit| there."""
    out = []
    for n_prompt, seq, ours in answered:
        lc.llm.reset()
        lc.llm.eval(seq)
        theirs = np.array(lc.llm.scores[: len(seq)], dtype=np.float32)
        for pos in range(n_prompt - 1, len(seq) - 1):
            top = np.argsort(ours[pos])[::-1][: RUNNERS_UP + 1]
            gap_ours = ours[pos, top[0]] - ours[pos, top[1:]]
            gap_theirs = theirs[pos, top[0]] - theirs[pos, top[1:]]
            shift = float(np.abs(gap_ours - gap_theirs).max())
            out.append((shift, shift / float(np.abs(ours[pos]).max())))
    return out


def verdicts(ref, runtimes: list[LlamaCpp], prompts: list, max_new_tokens: int) -> dict:
    """verify's rows for each runtime (by its type): same tokens, near ties, differing."""
    with contextlib.redirect_stdout(io.StringIO()):
        report = verify(ref, [], prompts, max_new_tokens, tuple(runtimes))
    out, tally = {}, report.tally()
    for lc in runtimes:
        name = f"llama.cpp:{lc.type.lower()}"
        rows = [r for r in report.rows if r.target == name]
        margins = [float(m) for r in rows if not r.tokens_ok
                   for m in re.findall(r"run's margin ([-\d.e+]+)", r.detail)]  # fmt: skip
        t = tally.get(name, dict.fromkeys(VERDICTS, 0))
        out[lc.type] = {"n": len(rows), "same": t["same"], "ties": t["near_tie"],
                        "differ": t["differ"], "margins": margins,
                        "problems": report.problems}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench-out/gguf-types"))
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--types", nargs="+", default=list(GGUF_TYPES), choices=GGUF_TYPES)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    spec, ref = load_reference(a.run)
    prompts = prompt_set(spec, a.num_prompts)
    saved = a.out / "shifts.json"  # each type's shifts, kept: a rerun judges with new bounds
    rows = json.loads(saved.read_text()) if saved.is_file() else {}
    answered, runtimes = None, []
    for t in a.types:
        path = a.out / f"{t}.gguf"
        if not path.is_file():
            export_gguf([a.run], path, t)
        lc = LlamaCpp(path)
        runtimes.append(lc)
        if t in rows:
            rows[t]["bound"] = describe_rounding(lc.type)
            continue
        answered = answered or answers(ref, prompts, a.max_new_tokens)
        start = time.perf_counter()
        s = shifts(lc, answered)
        absolute, share = [x for x, _ in s], [y for _, y in s]
        rows[t] = {"type": lc.type, "mib": path.stat().st_size / 2**20, "bound": describe_rounding(lc.type),
                   "shift_max": max(absolute), "shift_p99": float(np.percentile(absolute, 99)),
                   "shift_median": float(np.median(absolute)), "share_max": max(share),
                   "share_p99": float(np.percentile(share, 99)), "positions": len(s),
                   "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        print(t, json.dumps(rows[t]), flush=True)
        saved.write_text(json.dumps(rows, indent=1))
    for t, v in zip(a.types, verdicts(ref, runtimes, prompts, a.max_new_tokens).values()):
        rows[t].update(v)
    base_file = a.out / "base-as-run.gguf"
    if not base_file.is_file():
        write_gguf(load_model(spec.base_path).float(), ref.tok, base_file, "f32")
    as_types = []
    for t in a.types:  # the base, judged with each type's bound
        lc = LlamaCpp(base_file)
        lc.type = rows[t]["type"]
        as_types.append(lc)
    base = verdicts(ref, as_types, prompts, a.max_new_tokens)
    (a.out / "gguf_types.json").write_text(json.dumps({"run": str(a.run), "types": rows,
                                                       "base_as_run": base}, indent=1))  # fmt: skip
    print(
        f"\n{a.num_prompts} eval prompts, greedy, {a.max_new_tokens} new tokens; shift: the "
        f"change of the run's margin (its first choice over its second), over "
        f"{rows[a.types[0]]['positions']} answer positions (share: of the run's largest logit)"
    )
    print("| type | file | MiB | same tokens | near ties | differ | shift median / p99 / max | "
          "share p99 / max | bound | untrained base: prompts still DIFFER |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t, r in rows.items():
        b = base[r["type"]]
        print(f"| {t} | {r['type']} | {r['mib']:.0f} | {r['same']}/{r['n']} | {r['ties']} | "
              f"{r['differ']} | {r['shift_median']:.3f} / {r['shift_p99']:.3f} / "
              f"{r['shift_max']:.3f} | {r['share_p99']:.2%} / {r['share_max']:.2%} | "
              f"{r['bound']} | {b['differ']}/{b['n']} |")  # fmt: skip
    margins = next(iter(base.values()))["margins"]
    print(
        f"\nuntrained base written as the run (f32): the run's margins where it answers "
        f"otherwise: {sorted(round(m, 3) for m in margins)}"
    )


if __name__ == "__main__":
    main()
