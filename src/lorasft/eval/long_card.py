"""The report card of a context extension: did the run learn to use the longer context, or only
adapt to the text's domain? Four checks, computed from the evaluation by length (`evaluate_long`'s
result) and shown beside its raw tables:

(a) the short-context control: the tuned / untrained perplexity ratio at the shortest length
    (what training on this text gives with little context: domain adaptation) against the same
    ratio at the longest; their quotient is what the extension added (below 1: the run gained
    more at the long length than the domain alone explains). "Untrained" is the base with the
    run's scaling applied (the same reference at both lengths), or the base where nothing scales.
(b) the last doubling: the tuned run's perplexity at the longest length over half of it, next to
    the base's at its own window over half of that (a model that uses context gets better with
    more of it; the published 2x extensions end about 4-5% better). Goal: at most 0.99.
(c) passkey at the longest length, with a 95% Wilson interval, against the base's rate inside
    its own window (the most a fine-tune can be expected to keep). Goal: the tuned rate inside
    or above the interval of the base's.
(d) short-context retention: the tuned run at the shortest length within 2% of the base there.
"""

from __future__ import annotations

import math
from typing import Any

Z95 = 1.959964
"""The normal quantile of a two-sided 95% interval."""
DOUBLING_GOAL = 0.99
RETENTION_GOAL = 1.02
ENOUGH_TRIALS = 50
"""Passkey trials per length below which the card says the interval is too wide to judge by."""


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a rate of hits/n (exact at 0 and n, unlike the normal one)."""
    if n <= 0:
        return 0.0, 1.0
    p, z2 = hits / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)


def passkey_rate(grid: dict[str, Any] | None, length: int) -> dict[str, Any] | None:
    """Hits over trials at `length` (every depth), with the interval; None when not measured."""
    if not grid:
        return None
    rows = [r for r in grid.get("records", []) if r["length"] == length]
    if not rows:
        return None
    hits, n = sum(bool(r["correct"]) for r in rows), len(rows)
    lo, hi = wilson(hits, n)
    return {"length": length, "hits": hits, "trials": n, "rate": round(hits / n, 4),
            "interval": [round(lo, 4), round(hi, 4)], "enough": n >= ENOUGH_TRIALS}  # fmt: skip


def _ppl(res: dict[str, Any], model: str, n: int) -> float | None:
    return res["perplexity"].get(model, {}).get(str(n), {}).get("perplexity")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def report_card(res: dict[str, Any]) -> dict[str, Any]:
    """The four checks, each with its numbers, its goal and whether it is met (None: not
    measurable with these lengths or models)."""
    lengths = sorted(res["lengths"])
    short, long, window = lengths[0], lengths[-1], res["original_window"]
    untrained = "base_scaled" if "base_scaled" in res["perplexity"] else "base"
    at_short = _ratio(_ppl(res, "tuned", short), _ppl(res, untrained, short))
    at_long = _ratio(_ppl(res, "tuned", long), _ppl(res, untrained, long))
    added = _ratio(at_long, at_short)
    control = {"untrained": untrained, "short": short, "long": long, "ratio_short": at_short,
               "ratio_long": at_long, "extension_gain": added,
               "used_context": None if added is None else added < 1.0}  # fmt: skip
    half = long // 2
    tuned_doubling = _ratio(_ppl(res, "tuned", long), _ppl(res, "tuned", half))
    base_doubling = _ratio(_ppl(res, "base", window), _ppl(res, "base", window // 2))
    doubling = {"tuned": tuned_doubling, "tuned_lengths": [half, long], "base": base_doubling,
                "base_lengths": [window // 2, window], "goal": DOUBLING_GOAL,
                "met": None if tuned_doubling is None else tuned_doubling <= DOUBLING_GOAL}  # fmt: skip
    tuned_pk = passkey_rate(res.get("passkey"), long)
    base_pk = passkey_rate(res.get("passkey_base_window"), window)
    met = None
    if tuned_pk and base_pk:
        met = tuned_pk["rate"] >= base_pk["interval"][0]
    passkey = {"tuned": tuned_pk, "base_in_window": base_pk, "met": met}
    retention_ratio = _ratio(_ppl(res, "tuned", short), _ppl(res, "base", short))
    retention = {"length": short, "ratio": retention_ratio, "goal": RETENTION_GOAL,
                 "met": None if retention_ratio is None else retention_ratio <= RETENTION_GOAL}  # fmt: skip
    return {"control": control, "doubling": doubling, "passkey": passkey, "retention": retention}


def _mark(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[met]


def _rate(p: dict[str, Any] | None) -> str:
    if p is None:
        return "not measured"
    lo, hi = p["interval"]
    few = "" if p["enough"] else f"; under {ENOUGH_TRIALS} trials: too few to judge by"
    return f"{p['hits']}/{p['trials']} = {p['rate']:.0%} (95% interval {lo:.0%}-{hi:.0%}{few})"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _control_line(c: dict[str, Any]) -> str:
    used = {True: "the run gained more at the long length than at the short one",
            False: "no more gain at the long length than at the short one: domain adaptation, "
                   "not the longer context", None: "not measured"}[c["used_context"]]  # fmt: skip
    return (f"(a) control: tuned / {c['untrained']} perplexity {_num(c['ratio_short'])} at "
            f"{c['short']}, {_num(c['ratio_long'])} at {c['long']}: extension gain "
            f"{_num(c['extension_gain'])} ({used})")  # fmt: skip


def _doubling_line(d: dict[str, Any]) -> str:
    (h, n), (bh, bn) = d["tuned_lengths"], d["base_lengths"]
    return (f"(b) last doubling: tuned ppl@{n} / ppl@{h} = {_num(d['tuned'])} (goal <= "
            f"{d['goal']}: {_mark(d['met'])}); base inside its window, ppl@{bn} / ppl@{bh} = "
            f"{_num(d['base'])}")  # fmt: skip


def card_lines(card: dict[str, Any]) -> list[str]:
    """The card as sentences, for the console and report.html."""
    p, r = card["passkey"], card["retention"]
    passkey = (f"(c) passkey: tuned at the longest length {_rate(p['tuned'])}; base inside its "
               f"window {_rate(p['base_in_window'])}: {_mark(p['met'])}")  # fmt: skip
    retention = (f"(d) retention: tuned / base perplexity at {r['length']} = {_num(r['ratio'])} "
                 f"(goal <= {r['goal']}: {_mark(r['met'])})")  # fmt: skip
    return [_control_line(card["control"]), _doubling_line(card["doubling"]), passkey, retention]
