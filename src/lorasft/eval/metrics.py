"""Generation metrics: exact match, ROUGE-L and chrF, scored at character level for CJK text.

rouge-score's default tokenizer keeps only [a-z0-9] and so scores any Chinese answer as zero;
here CJK characters are tokens of their own and other text splits into words.
"""

from __future__ import annotations

import json
import re

from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
TOKEN = re.compile(rf"[{CJK}]|[^\s{CJK}\W]+|[^\s\w]", re.UNICODE)


class MixedTokenizer:
    """CJK characters one by one, other scripts as words, punctuation as its own tokens."""

    def tokenize(self, text: str) -> list[str]:
        return TOKEN.findall(text.lower())


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=MixedTokenizer())
_CHRF = CHRF()


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def rouge_l(prediction: str, reference: str) -> float:
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def chrf(prediction: str, reference: str) -> float:
    return _CHRF.sentence_score(prediction, [reference]).score / 100.0


def score(prediction: str, reference: str) -> dict[str, float]:
    return {
        "exact_match": exact_match(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
        "chrf": chrf(prediction, reference),
    }


def json_object(text: str) -> dict | None:
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def json_scores(prediction: str, reference: str) -> tuple[float, float]:
    """(valid, fields): whether the answer is one JSON object, and the share of the reference
    object's top-level fields it gives with the same value."""
    ref, got = json_object(reference), json_object(prediction)
    if got is None or not ref:
        return 0.0, 0.0
    return 1.0, sum(got.get(k) == v for k, v in ref.items()) / len(ref)


def aggregate(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Means over samples, as percentages; chrF is corpus-level (sacrebleu's definition). When
    every reference is a JSON object: also json_valid and json_fields (per-field accuracy)."""
    if not predictions:
        return {"exact_match": 0.0, "rouge_l": 0.0, "chrf": 0.0, "n": 0}
    rows = [score(p, r) for p, r in zip(predictions, references)]
    n = len(rows)
    out = {
        "exact_match": round(100 * sum(r["exact_match"] for r in rows) / n, 2),
        "rouge_l": round(100 * sum(r["rouge_l"] for r in rows) / n, 2),
        "chrf": round(_CHRF.corpus_score(predictions, [references]).score, 2),
        "n": n,
    }
    if all(json_object(r) for r in references):
        pairs = [json_scores(p, r) for p, r in zip(predictions, references)]
        out["json_valid"] = round(100 * sum(v for v, _ in pairs) / n, 2)
        out["json_fields"] = round(100 * sum(f for _, f in pairs) / n, 2)
    return out
