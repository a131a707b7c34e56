"""Passkey retrieval (Mohtashami & Jaggi 2023, as run by LongLoRA and YaRN).

A 5-digit key sits at a chosen depth inside filler text of a given token length
(`data/passkey.py` builds the prompt); the model reads it greedily back after a question, and
the first integer it writes is compared to the key.
"""

from __future__ import annotations

import copy
import random
import re

import torch

from lorasft.data.passkey import build_prompt
from lorasft.model.generation import GenSettings


def first_integer(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


@torch.no_grad()
def answer(model, tok, ids: list[int], max_new_tokens: int = 10, prefix_cache=None) -> str:
    """The greedy answer to `ids`; with `prefix_cache` (the KV cache of the first tokens of
    `ids`, from `prefill`), only the rest is read."""
    input_ids = torch.tensor([ids], device=model.device)
    cached = {} if prefix_cache is None else {"cache": copy.deepcopy(prefix_cache)}
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **cached,
                         **GenSettings.greedy(max_new_tokens).kwargs(tok))  # fmt: skip
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


@torch.no_grad()
def prefill(model, ids: list[int]):
    """The KV cache of `ids` (the output head only at the last position)."""
    out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True,
                logits_to_keep=1)  # fmt: skip
    return out.cache


def shared_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one token of its own to read."""
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != prompts[0][i]), n)
    return max(n, 0)


MIN_PREFIX = 64  # fewer shared tokens than this: not worth a cache copy


def passkey_grid(model, tok, lengths: list[int], depths: list[float], trials: int = 2,
                 seed: int = 0, max_new_tokens: int = 10, reuse_prefix: bool = True) -> dict:  # fmt: skip
    """Accuracy per length (rows) x depth (columns), with every trial's key and answer.

    The trials of a cell differ only from their needle on, so with `reuse_prefix` the filler
    before it is read once per cell and its KV cache reused by every trial (greedy answers as
    from the whole prompt: the same computation, up to floating-point summation order): a
    cell costs the prefix once plus each trial's rest, about half of the whole over 5 depths."""
    rng = random.Random(seed)
    accuracy, records = [], []
    for length in lengths:
        row = []
        for depth in depths:
            prompts = [build_prompt(tok, length, depth, rng.randint(10000, 99999))
                       for _ in range(trials)]  # fmt: skip
            n = shared_prefix([p.ids for p in prompts]) if trials > 1 and reuse_prefix else 0
            cache = prefill(model, prompts[0].ids[:n]) if n >= MIN_PREFIX else None
            hits = 0
            for p in prompts:
                text = answer(model, tok, p.ids, max_new_tokens, cache)
                hit = first_integer(text) == p.key
                hits += hit
                records.append({"length": length, "tokens": len(p.ids), "depth": depth,
                                "key": p.key, "answer": text.strip()[:40], "correct": hit})  # fmt: skip
            del cache
            row.append(round(hits / trials, 4))
        accuracy.append(row)
    return {"lengths": lengths, "depths": depths, "trials": trials, "accuracy": accuracy,
            "records": records}  # fmt: skip
