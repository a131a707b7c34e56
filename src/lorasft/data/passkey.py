"""The passkey prompt (Mohtashami & Jaggi 2023): a 5-digit key at a chosen depth inside filler
text of a given token length, then the question. Evaluation scores models on it
(`eval/passkey.py`); `verify --long` uses it as a long text."""

from __future__ import annotations

from dataclasses import dataclass

from lorasft.data.templates import adds_bos

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
