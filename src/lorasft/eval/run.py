"""Evaluate a tuned model: response-token perplexity, generation metrics, base vs tuned."""

from __future__ import annotations

import time
from typing import Any

from lorasft.config import EvalSection
from lorasft.data.formats import Example
from lorasft.data.templates import prompt_messages
from lorasft.data.tokenize import Encoded
from lorasft.eval.generate import GenSettings, generate
from lorasft.eval.metrics import aggregate, score
from lorasft.eval.perplexity import perplexity


def _with_adapter(model, enabled: bool, fn):
    if enabled:
        return fn()
    with model.disable_adapter():
        return fn()


def evaluate(model, tok, eval_examples: list[Example], eval_encoded: list[Encoded],
             ev: EvalSection) -> dict[str, Any]:  # fmt: skip
    start = time.perf_counter()
    out: dict[str, Any] = {"loss_on": "response tokens only (the tokens in the loss mask)"}
    ppl = lambda: perplexity(model, eval_encoded, tok.pad_token_id, ev.batch_size)
    out["tuned"] = {"perplexity": ppl()}
    if ev.compare_base:
        out["base"] = {"perplexity": _with_adapter(model, False, ppl)}
    chats = [ex for ex in eval_examples if not ex.is_text][: ev.num_samples]
    if chats:
        out["samples"] = _generation(model, tok, chats, ev, out)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def _generation(model, tok, chats: list[Example], ev: EvalSection, out: dict) -> list[dict]:
    gen = GenSettings.from_config(ev)
    prompts = [prompt_messages(ex.messages) for ex in chats]
    refs = [ex.messages[-1]["content"] for ex in chats]
    tuned = generate(model, tok, prompts, gen)
    out["tuned"]["generation"] = aggregate(tuned, refs)
    base = generate(model, tok, prompts, gen, base=True) if ev.compare_base else [None] * len(refs)
    if ev.compare_base:
        out["base"]["generation"] = aggregate(base, refs)
    out["generation_settings"] = vars(gen)
    rows = []
    for ex, p, r, t, b in zip(chats, prompts, refs, tuned, base):
        row = {"source": ex.source, "prompt": p[-1]["content"], "reference": r, "tuned": t,
               "tuned_scores": score(t, r)}  # fmt: skip
        if b is not None:
            row.update(base=b, base_scores=score(b, r))
        rows.append(row)
    return rows
