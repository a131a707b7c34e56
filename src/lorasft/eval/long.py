"""Evaluation by length (`lorasft eval RUN --long`, and after a run with `context.target_length`):
perplexity by length for the base, the scaled base and the tuned run; passkey retrieval;
where attention goes on a long input. Plots and a table; numbers for results.json."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasft.config import Config
from lorasft.eval.attention import attention_by_distance
from lorasft.eval.long_data import read_documents, token_stream
from lorasft.eval.long_models import base_variants, eager_attention, position_limit, window_and_plan
from lorasft.eval.passkey import passkey_grid
from lorasft.eval.sliding import sliding_perplexity
from lorasft.model.context import length_ladder
from lorasft.model.run import frozen_dtype


@dataclass
class LongSettings:
    lengths: list[int] | None = None
    """Context lengths; None: half the original window, doubling, up to the target."""
    stride: int | None = None
    """Window stride; None: half of each length."""
    max_windows: int = 4
    """Windows read per length (caps the tokens and the time)."""
    data: list[str] | None = None
    """Text / JSONL (`text`) files; None: the text the package ships."""
    passkey_lengths: list[int] | None = None
    """None: the same lengths as perplexity."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    seed: int = 0
    attention_length: int | None = None
    """Tokens of the attention check; None: the largest length, at most 4096 (eager attention
    holds one layer's heads x L x L matrix)."""


def _ppl_row(model, ids: list[int], lengths: list[int], s: LongSettings) -> dict[str, Any]:
    row, limit = {}, position_limit(model)
    for n in lengths:
        if limit is not None and n > limit:
            row[str(n)] = {"perplexity": None, "reason": f"beyond the model's {limit} positions"}
            continue
        row[str(n)] = sliding_perplexity(model, ids, n, s.stride or max(1, n // 2), s.max_windows)
    return row


def _perplexities(tuned, cfg: Config, plan, ids: list[int], lengths: list[int],
                  s: LongSettings) -> tuple[dict, dict]:  # fmt: skip
    out, labels = {}, {}
    for name, (label, load) in base_variants(cfg, plan, frozen_dtype(tuned)).items():
        model = load()
        out[name], labels[name] = _ppl_row(model, ids, lengths, s), label
        del model
        gc.collect()
    out["tuned"], labels["tuned"] = _ppl_row(tuned, ids, lengths, s), "tuned run"
    return out, labels


def evaluate_long(tuned, tok, cfg: Config, settings: LongSettings | None = None,
                  out_dir: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """All three checks on `tuned` (a PeftModel with the run's context applied)."""
    from lorasft.report.long_report import print_long, write_long_plots

    s, start = settings or LongSettings(), time.perf_counter()
    original, plan = window_and_plan(cfg)
    target = cfg.context.target_length or 2 * original
    lengths = s.lengths or length_ladder(original, target)
    ids = token_stream(read_documents(s.data), tok)
    tuned.eval()
    ppl, labels = _perplexities(tuned, cfg, plan, ids, lengths, s)
    res: dict[str, Any] = {
        "original_window": original, "target_length": target,
        "method": plan.method if plan else None, "factor": plan.factor if plan else None,
        "data_tokens": len(ids), "stride": s.stride or "half of each length",
        "max_windows": s.max_windows, "lengths": lengths, "labels": labels, "perplexity": ppl,
    }  # fmt: skip
    limit = position_limit(tuned)
    pk_lengths = [n for n in s.passkey_lengths or lengths if limit is None or n <= limit]
    res["passkey"] = passkey_grid(tuned, tok, pk_lengths, s.depths, s.trials, s.seed)
    n_attn = s.attention_length or min(max(lengths), 4096)
    with eager_attention(tuned):
        res["attention"] = attention_by_distance(tuned, ids[:n_attn])
    res["seconds"] = round(time.perf_counter() - start, 2)
    if out_dir is not None:
        res["plots"] = write_long_plots(res, Path(out_dir))
    print_long(res)
    return res
