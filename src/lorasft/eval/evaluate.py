"""Evaluate a tuned model: response-token perplexity, generation metrics, base vs tuned."""

from __future__ import annotations

import time
from typing import Any

from lorasft.config import EvalSection
from lorasft.console import say
from lorasft.data.formats import Example
from lorasft.data.templates import prompt_messages
from lorasft.data.tokenize import Encoded, prompt_ids
from lorasft.eval import base_cache
from lorasft.eval.generate import generate
from lorasft.eval.metrics import aggregate, score
from lorasft.eval.perplexity import perplexity
from lorasft.model.generation import GenSettings
from lorasft.model.loss import DEFAULT_LOSS, LossSettings


def _with_adapter(model, enabled: bool, fn):
    if enabled:
        return fn()
    with model.disable_adapter():
        return fn()


def evaluate(model, tok, eval_examples: list[Example], eval_encoded: list[Encoded],
             ev: EvalSection, loss: LossSettings = DEFAULT_LOSS) -> dict[str, Any]:  # fmt: skip
    start = time.perf_counter()
    out: dict[str, Any] = {"loss_on": "response tokens only (the tokens in the loss mask)"}
    ppl = lambda: perplexity(model, eval_encoded, tok.pad_token_id, ev.batch_size, loss,
                             ev.batch_tokens)  # fmt: skip
    say(f"evaluation: perplexity of the tuned run on {len(eval_encoded)} records")
    out["tuned"] = {"perplexity": ppl()}
    chats, prompts, refs = chat_samples(eval_examples, ev.num_samples)
    gen = GenSettings.from_config(ev)
    # batched greedy rows generated again alone (near ties); batches of several rows, and those
    # whose decoding computed every row as alone
    stats = {"redone_alone": 0, "batches": 0, "batches_as_alone": 0}
    base_answers = None
    if ev.compare_base:
        base = _base_side(model, tok, prompts, eval_encoded, gen, ev.cache_base, ppl, stats)
        out["base"] = {"perplexity": base["perplexity"]}
        out["base_from_cache"] = base["cached"]
        base_answers = base["answers"]
    if chats:
        out["samples"] = _generation(
            model, tok, chats, prompts, refs, gen, out, base_answers, stats
        )
        out["generation_redone_alone"] = stats["redone_alone"]
        out["generation_batches_as_alone"] = f"{stats['batches_as_alone']} of {stats['batches']}"
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def chat_samples(examples: list[Example], limit: int):
    """`(records, prompts, references)`: the first `limit` chat records that evaluation generates
    on, each conversation without its final answer, and that answer."""
    chats = [ex for ex in examples if not ex.is_text][:limit]
    return (
        chats,
        [prompt_messages(ex.messages) for ex in chats],
        [ex.messages[-1]["content"] for ex in chats],
    )


def _base_side(model, tok, prompts: list[list[dict]], encoded: list[Encoded], gen: GenSettings,
               use_cache: bool, ppl, stats: dict) -> dict[str, Any]:  # fmt: skip
    """The base's perplexity and greedy answers: from the cache when this base was evaluated on
    these very inputs before, else computed (and kept)."""
    key = base_cache.base_key(model, [prompt_ids(m, tok) for m in prompts], encoded, vars(gen))
    found = base_cache.load(key) if use_cache else None
    if found is not None:
        say("evaluation: the base's perplexity and answers from the cache (same base, same inputs)")
        return {**found, "cached": True}
    say(
        f"evaluation: the base's perplexity on {len(encoded)} records"
        + (f" and {len(prompts)} answers" if prompts else "")
    )
    data = {"perplexity": _with_adapter(model, False, ppl),
            "answers": generate(model, tok, prompts, gen, base=True, stats=stats) if prompts else []}  # fmt: skip
    if use_cache:
        base_cache.save(key, data)
    return {**data, "cached": False}


def _generation(model, tok, chats: list[Example], prompts: list[list[dict]], refs: list[str],
                gen: GenSettings, out: dict, base: list[str] | None,
                stats: dict) -> list[dict]:  # fmt: skip
    say(f"evaluation: {len(prompts)} answers of the tuned run (up to {gen.max_new_tokens} tokens)")
    tuned = generate(model, tok, prompts, gen, stats=stats)
    out["tuned"]["generation"] = aggregate(tuned, refs)
    if base is not None:
        out["base"]["generation"] = aggregate(base, refs)
    out["generation_settings"] = vars(gen)
    rows = []
    for ex, p, r, t, b in zip(chats, prompts, refs, tuned, base or [None] * len(refs)):
        row = {"source": ex.source, "prompt": p[-1]["content"], "reference": r, "tuned": t,
               "tuned_scores": score(t, r)}  # fmt: skip
        if b is not None:
            row.update(base=b, base_scores=score(b, r))
        rows.append(row)
    return rows
