"""Evaluation by length (`lorasft eval RUN --long`, and after a run with `context.target_length`):
perplexity by length for the base, the scaled base and the tuned run; passkey retrieval;
where attention goes on a long input. Plots and a table; numbers for results.json."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasft.config import Config, EvalSection
from lorasft.eval.attention import attention_by_distance
from lorasft.eval.long_card import report_card
from lorasft.eval.long_data import read_documents, token_stream
from lorasft.eval.long_models import base_variants, eager_attention, position_limit, window_and_plan
from lorasft.eval.passkey import passkey_grid
from lorasft.eval.sliding import same_tokens_perplexity, sliding_perplexity
from lorasft.model.context import length_ladder
from lorasft.model.loss import LossSettings
from lorasft.model.reopen import frozen_dtype


@dataclass
class LongSettings:
    lengths: list[int] | None = None
    """Context lengths; None: half the original window, doubling, up to the target."""
    protocol: str = "same_tokens"
    """same_tokens: the last `scored` tokens before each end point, read with each length of
    context (lengths compare along a row); sliding: windows of each length advancing by `stride`."""
    scored: int = 512
    """same_tokens: tokens scored at each end point."""
    stride: int | None = None
    """sliding: window stride; None: half of each length."""
    max_windows: int = 4
    """End points (same_tokens) or windows per length (sliding): caps the tokens and the time."""
    data: list[str] | None = None
    """Text / JSONL (`text`) files; None: the text the package ships."""
    passkey_lengths: list[int] | None = None
    """None: the same lengths as perplexity."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    passkey_before: bool = True
    """Passkey also for the base with the scaling untrained (the before of a before/after)."""
    seed: int = 0
    attention_length: int | None = None
    """Tokens of the attention check; None: the largest length, at most 4096 (eager attention
    holds one layer's heads x L x L matrix)."""


def long_settings(ev: EvalSection, **overrides: Any) -> LongSettings:
    """The run's evaluation by length (its `eval.long_*` settings), with `overrides` (the
    `lorasft eval --long` flags given) on top."""
    s = LongSettings(lengths=ev.long_lengths, scored=ev.long_scored, max_windows=ev.long_windows,
                     data=ev.long_data, depths=list(ev.passkey_depths), trials=ev.passkey_trials,
                     passkey_lengths=ev.passkey_lengths,
                     passkey_before=ev.passkey_before)  # fmt: skip
    for name, value in overrides.items():
        setattr(s, name, value)
    return s


def _ppl_row(model, ids: list[int], lengths: list[int], s: LongSettings,
             loss: LossSettings) -> dict[str, Any]:  # fmt: skip
    limit = position_limit(model)
    fits = [n for n in lengths if limit is None or n <= limit]
    row = {str(n): {"perplexity": None, "reason": f"beyond the model's {limit} positions"}
           for n in lengths if n not in fits}  # fmt: skip
    if s.protocol == "same_tokens" and fits:
        scored = min(s.scored, min(lengths) - 1)  # one value for every model and length
        row.update(same_tokens_perplexity(model, ids, fits, scored, s.max_windows, max(lengths),
                                          loss))  # fmt: skip
    for n in fits if s.protocol == "sliding" else []:
        stride = s.stride or max(1, n // 2)
        row[str(n)] = sliding_perplexity(model, ids, n, stride, s.max_windows, loss)
    return {str(n): row[str(n)] for n in lengths}


def _by_model(tuned, cfg: Config, plan, ids: list[int], lengths: list[int], pk_lengths: list[int],
              tok, s: LongSettings, window: int) -> tuple[dict, dict, dict]:  # fmt: skip
    """Perplexity rows for every base variant and the tuned run; passkey grids for the tuned run
    and (passkey_before) the base with the scaling untrained, and always the base inside its
    own `window` (the report card's reference rate, whenever passkey reaches the window)."""
    ppl, labels, passkey = {}, {}, {}
    loss = LossSettings.from_train(cfg.train)
    for name, (label, load) in base_variants(cfg, plan, frozen_dtype(tuned)).items():
        model = load()
        ppl[name], labels[name] = _ppl_row(model, ids, lengths, s, loss), label
        if name == "base_scaled" and s.passkey_before:
            passkey[name] = passkey_grid(model, tok, pk_lengths, s.depths, s.trials, s.seed)
        if name == "base" and pk_lengths and window <= max(pk_lengths):
            passkey["base_window"] = passkey_grid(model, tok, [window], s.depths, s.trials, s.seed)
        del model
        gc.collect()
    ppl["tuned"], labels["tuned"] = _ppl_row(tuned, ids, lengths, s, loss), "tuned run"
    passkey["tuned"] = passkey_grid(tuned, tok, pk_lengths, s.depths, s.trials, s.seed)
    return ppl, labels, passkey


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
    limit = position_limit(tuned)
    pk_lengths = [n for n in s.passkey_lengths or lengths if limit is None or n <= limit]
    ppl, labels, passkey = _by_model(tuned, cfg, plan, ids, lengths, pk_lengths, tok, s, original)
    res: dict[str, Any] = {
        "original_window": original, "target_length": target,
        "method": plan.method if plan else None, "factor": plan.factor if plan else None,
        "data_tokens": len(ids), "protocol": s.protocol,
        "scored": s.scored if s.protocol == "same_tokens" else None,
        "stride": None if s.protocol == "same_tokens" else s.stride or "half of each length",
        "max_windows": s.max_windows, "lengths": lengths, "labels": labels, "perplexity": ppl,
        "passkey": passkey["tuned"], "passkey_base": passkey.get("base_scaled"),
        "passkey_base_window": passkey.get("base_window"),
    }  # fmt: skip
    res["card"] = report_card(res)
    n_attn = s.attention_length or min(max(lengths), 4096)
    with eager_attention(tuned):
        res["attention"] = attention_by_distance(tuned, ids[:n_attn])
    res["seconds"] = round(time.perf_counter() - start, 2)
    if out_dir is not None:
        res["plots"] = write_long_plots(res, Path(out_dir))
    print_long(res)
    return res
