"""Passkey retrieval (Mohtashami & Jaggi 2023, as run by LongLoRA and YaRN).

A 5-digit key sits at a chosen depth inside filler text of a given token length; the model
reads it greedily back after a question, and the first integer it writes is compared to the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from lorasft.data.templates import adds_bos
from lorasft.eval.generate import GenSettings

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "it. I will quiz you about the important information there.")  # fmt: skip
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    text: str
    ids: list[int]
    key: int
    depth: float
    filler_before: int
    filler_total: int


def _count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def build_prompt(tok, length: int, depth: float, key: int) -> PasskeyPrompt:
    """About `length` tokens (never more, within one filler sentence less), the needle after
    `depth` of the filler (0 = right after the task line, 1 = right before the question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth {depth}: must be between 0 and 1")
    needle = NEEDLE.format(key=key)
    bos = [tok.bos_token_id] if adds_bos(tok) else []  # as the perplexity windows start
    fixed = _count(tok, f"{TASK} {needle} {QUESTION}") + len(bos)
    unit = _count(tok, f" {FILLER}")
    total = max(0, (length - fixed) // unit)
    while True:
        before = round(depth * total)
        parts = [TASK, *[FILLER] * before, needle, *[FILLER] * (total - before), QUESTION]
        text = " ".join(parts)
        ids = bos + tok(text, add_special_tokens=False).input_ids
        if len(ids) <= length or total == 0:
            return PasskeyPrompt(text, ids, key, depth, before, total)
        total -= 1  # BPE merges at the joins can add a token or two


def first_integer(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


@torch.no_grad()
def answer(model, tok, ids: list[int], max_new_tokens: int = 10) -> str:
    input_ids = torch.tensor([ids], device=model.device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         **GenSettings.greedy(max_new_tokens).kwargs(tok))  # fmt: skip
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def passkey_grid(model, tok, lengths: list[int], depths: list[float], trials: int = 2,
                 seed: int = 0, max_new_tokens: int = 10) -> dict:  # fmt: skip
    """Accuracy per length (rows) x depth (columns), with every trial's key and answer."""
    rng = random.Random(seed)
    accuracy, records = [], []
    for length in lengths:
        row = []
        for depth in depths:
            hits = 0
            for _ in range(trials):
                p = build_prompt(tok, length, depth, rng.randint(10000, 99999))
                text = answer(model, tok, p.ids, max_new_tokens)
                hit = first_integer(text) == p.key
                hits += hit
                records.append({"length": length, "tokens": len(p.ids), "depth": depth,
                                "key": p.key, "answer": text.strip()[:40], "correct": hit})  # fmt: skip
            row.append(round(hits / trials, 4))
        accuracy.append(row)
    return {"lengths": lengths, "depths": depths, "trials": trials, "accuracy": accuracy,
            "records": records}  # fmt: skip
