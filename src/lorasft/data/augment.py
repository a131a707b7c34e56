"""Text augmentation of the instruction/input side of training records; never the response.

Words are segmented with jieba, which splits Chinese into words (whitespace splitting leaves a
Chinese sentence as one "word") and English on spaces and punctuation alike. Words that occur in
the response are never swapped, deleted or replaced, so an extraction target stays in its input.
"""

from __future__ import annotations

import copy
import random
import re
from functools import cache

from lorasft.console import say
from lorasft.data.formats import DataError, Example

WORD = re.compile(r"\w", re.UNICODE)


@cache
def _jieba():
    try:
        import jieba
    except ImportError:
        raise DataError(
            "data.augment.ratio > 0 segments text into words with jieba, which is not "
            "installed: pip install 'lorasft[augment]'"
        ) from None

    jieba.setLogLevel(60)
    return jieba


@cache
def wordnet():
    """nltk's WordNet when its data is installed, else None (synonyms are then skipped)."""
    try:
        from nltk.corpus import wordnet as wn

        wn.synsets("dog")
        return wn
    except (ImportError, LookupError):
        say("augment: WordNet data not installed; synonym replacement skipped")  # fmt: skip
        return None


def segment(text: str) -> list[str]:
    return _jieba().lcut(text)


def _word_positions(tokens: list[str], protected: str) -> list[int]:
    return [i for i, t in enumerate(tokens) if WORD.search(t) and t not in protected]


def _synonym(word: str, rng: random.Random) -> str | None:
    wn = wordnet() if word.isascii() else None
    if wn is None:
        return None
    names = {l.name().replace("_", " ") for s in wn.synsets(word) for l in s.lemmas()}
    names.discard(word)
    return rng.choice(sorted(names)) if names else None


def augment_text(text: str, method: str, prob: float, rng: random.Random, protected: str) -> str:
    tokens = segment(text)
    positions = _word_positions(tokens, protected)
    if len(positions) < 2:
        return text
    k = max(1, round(prob * len(positions)))
    if method == "delete":
        drop = set(rng.sample(positions, min(k, len(positions) - 1)))
        tokens = [t for i, t in enumerate(tokens) if i not in drop]
    elif method == "swap":
        for _ in range(k):
            a, b = rng.sample(positions, 2)
            tokens[a], tokens[b] = tokens[b], tokens[a]
    elif method == "synonym":
        for i in rng.sample(positions, min(k, len(positions))):
            tokens[i] = _synonym(tokens[i], rng) or tokens[i]
    return "".join(tokens)


def augment_example(ex: Example, method: str, prob: float, rng: random.Random) -> Example:
    new = copy.deepcopy(ex)
    protected = " ".join(m["content"] for m in ex.messages if m["role"] == "assistant")
    for msg in new.messages:
        if msg["role"] != "user":
            continue
        if "input" in msg:
            msg["instruction"] = augment_text(msg["instruction"], method, prob, rng, protected)
            msg["input"] = augment_text(msg["input"], method, prob, rng, protected)
            msg["content"] = f"{msg['instruction']}\n\n{msg['input']}"
        else:
            msg["content"] = augment_text(msg["content"], method, prob, rng, protected)
    new.source = f"{ex.source} (augmented: {method})"
    return new


def augment_examples(
    examples: list[Example], ratio: float, methods: list[str], prob: float, seed: int
) -> list[Example]:
    """Augmented copies (about `ratio` per original) to add beside the originals; raw-text records
    are left alone. Copies identical to their original are not added."""
    rng = random.Random(seed)
    candidates = [ex for ex in examples if not ex.is_text]
    n = round(ratio * len(candidates))
    out = []
    for i in range(n):
        ex = candidates[i % len(candidates)]
        new = augment_example(ex, rng.choice(methods), prob, rng)
        if new.messages != ex.messages:
            out.append(new)
    return out
