"""From data config to tokenized train/eval sets, with every count a user needs to see."""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from lorasft.config import DataSection
from lorasft.data.augment import augment_examples
from lorasft.data.formats import (
    DataError,
    Example,
    LoadResult,
    Saved,
    expand_paths,
    ignored_line,
    load_files,
)
from lorasft.data.templates import with_system
from lorasft.data.tokenize import Encoded, EncodeStats, encode_examples


def demo_files() -> tuple[str, str]:
    assets = files("lorasft") / "assets"
    return str(assets / "demo_train.jsonl"), str(assets / "demo_eval.jsonl")


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def data_files(cfg: DataSection) -> tuple[list[str], list[str]]:
    if cfg.train_file is None:
        train, evals = demo_files()
        return [train], _as_list(cfg.eval_file) or [evals]
    return _as_list(cfg.train_file), _as_list(cfg.eval_file)


@dataclass
class Prepared:
    train: list[Encoded]
    eval: list[Encoded]
    train_examples: list[Example]
    eval_examples: list[Example]
    counts: dict[str, Any] = field(default_factory=dict)


def split(
    examples: list[Example], val_ratio: float, seed: int
) -> tuple[list[Example], list[Example]]:
    if val_ratio <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * val_ratio))
    if n_eval >= len(examples):
        raise DataError(f"data.val_ratio={val_ratio} leaves no training records of {len(examples)}")
    eval_idx = set(order[:n_eval])
    return (
        [e for i, e in enumerate(examples) if i not in eval_idx],
        [e for i, e in enumerate(examples) if i in eval_idx],
    )


BINS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def histogram(lengths: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    lo = 0
    for hi in BINS:
        out[f"{lo + 1}-{hi}"] = sum(1 for n in lengths if lo < n <= hi)
        lo = hi
    out[f">{BINS[-1]}"] = sum(1 for n in lengths if n > BINS[-1])
    return {k: v for k, v in out.items() if v}


def _load_counts(res: LoadResult) -> dict[str, Any]:
    return {
        "files": [asdict(f) for f in res.files],
        "records": len(res.examples),
        "bad_records": [str(b) for b in res.bad],
        "skipped_bad": len(res.bad),
        "duplicates_dropped": res.duplicates,
        "ignored_files": res.ignored,
    }


def _encode_counts(stats: EncodeStats, encoded: list[Encoded]) -> dict[str, Any]:
    tokens = sum(len(e) for e in encoded)
    supervised = sum(e.n_supervised for e in encoded)
    return {
        "sequences": len(encoded),
        "truncated_prompt": stats.truncated,
        "dropped_too_long": len(stats.dropped_too_long),
        "dropped_too_long_sources": stats.dropped_too_long[:50],
        "long_text": stats.text,
        "tokens": tokens,
        "supervised_tokens": supervised,
        "supervised_share": round(supervised / tokens, 4) if tokens else 0.0,
        "prompt_lengths": histogram([e.response_start for e in encoded if e.response_start]),
        "response_lengths": histogram(
            [len(e) - e.response_start for e in encoded if e.response_start]
        ),
    }


_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


def answer_han_share(examples: list[Example]) -> float | None:
    """The share of Chinese characters (Han: CJK unified and compatibility ideographs) among the
    characters of the assistant turns, whitespace not counted; None when there are none (text)."""
    answers = "".join(
        m["content"] for ex in examples for m in ex.messages if m["role"] == "assistant"
    )
    chars = re.sub(r"\s", "", answers)
    return len(_HAN.findall(chars)) / len(chars) if chars else None


# The training files as the answer-language rule read them, handed on to the run's own read of
# the same unchanged files (taken, not shared: that reader adds system prompts in place).
_READ_AHEAD: dict[tuple, LoadResult] = {}


def _read(paths: list[str], cfg: DataSection) -> LoadResult:
    return load_files(paths, cfg.format, cfg.on_bad_record, cfg.dedup, cfg.allow_download)


def _read_key(paths: list[str], cfg: DataSection) -> tuple:
    entries = expand_paths(paths, cfg.allow_download)[0]
    files = [f for e in entries for f in (sorted(e.folder.rglob("*")) if isinstance(e, Saved)
                                          else [e]) if f.is_file()]  # fmt: skip
    stamps = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return (tuple(paths), cfg.format, cfg.on_bad_record, cfg.dedup, stamps)


def training_answers_han_share(cfg: DataSection) -> float | None:
    """`answer_han_share` of the training files (before any split), for `for_answers`; the files
    read here are not read again by `load_split`."""
    paths = data_files(cfg)[0]
    res = _read(paths, cfg)
    _READ_AHEAD.clear()
    _READ_AHEAD[_read_key(paths, cfg)] = res
    return answer_han_share(res.examples)


def _load_training(paths: list[str], cfg: DataSection) -> LoadResult:
    ahead = _READ_AHEAD.pop(_read_key(paths, cfg), None) if _READ_AHEAD else None
    return ahead or _read(paths, cfg)


def load_split(cfg: DataSection) -> tuple[list[Example], list[Example], dict[str, Any]]:
    train_paths, eval_paths = data_files(cfg)
    res = _load_training(train_paths, cfg)
    counts: dict[str, Any] = {"train_files": _load_counts(res)}
    if eval_paths:
        eres = _read(eval_paths, cfg)
        counts["eval_files"] = _load_counts(eres)
        return res.examples, eres.examples, counts
    train, evals = split(res.examples, cfg.val_ratio, cfg.seed)
    counts["split"] = {"val_ratio": cfg.val_ratio, "seed": cfg.seed, "eval_records": len(evals)}
    return train, evals, counts


def add_system_prompt(examples: list[Example], cfg: DataSection) -> list[Example]:
    """data.system_prompt on every record that has no system message: what training, its
    evaluation and `data check` see."""
    for ex in examples:
        ex.messages = with_system(ex.messages, cfg.system_prompt)
    return examples


def encode(examples: list[Example], tokenizer, cfg: DataSection):
    """Tokens and loss masks under the data section's length rules."""
    return encode_examples(examples, tokenizer, cfg.max_length, cfg.truncation,
                           cfg.train_on_prompt, cfg.keep_tail)  # fmt: skip


def eval_set(cfg: DataSection, tokenizer, data_file: str | None = None):
    """`(examples, encoded)` a finished run is evaluated on: its eval split, or another file."""
    if data_file:
        cfg = cfg.model_copy(update={"train_file": data_file, "eval_file": None, "val_ratio": 0.0})
        examples, _, _ = load_split(cfg)
    else:
        _, examples, _ = load_split(cfg)
    add_system_prompt(examples, cfg)
    return examples, encode(examples, tokenizer, cfg)[0]


def prepare(cfg: DataSection, tokenizer) -> Prepared:
    train, evals, counts = load_split(cfg)
    add_system_prompt(train + evals, cfg)
    aug = cfg.augment
    extra = augment_examples(train, aug.ratio, aug.methods, aug.prob, cfg.seed) if aug.ratio else []
    counts["augmented_added"] = len(extra)
    enc_train, s_train = encode(train + extra, tokenizer, cfg)
    # Eval is encoded with the same mask rules, so eval loss is on response tokens as in training.
    enc_eval, s_eval = encode(evals, tokenizer, cfg)
    counts["train"] = _encode_counts(s_train, enc_train)
    counts["eval"] = _encode_counts(s_eval, enc_eval)
    if not enc_train:
        raise DataError(
            f"no training sequences left after length filtering (data.max_length={cfg.max_length}); "
            "raise max_length or set data.truncation=truncate_prompt"
        )
    return Prepared(enc_train, enc_eval, train, evals, counts)


def describe(counts: dict[str, Any]) -> list[str]:
    """Console lines for the counts, so skips and cuts are seen, not only written to a file."""
    lines = []
    for key in ("train_files", "eval_files"):
        c = counts.get(key)
        if c:
            lines.append(
                f"{key.split('_')[0]}: {c['records']} records from "
                f"{', '.join(Path(f['path']).name + ' (' + f['format'] + ')' for f in c['files'])}; "
                f"bad skipped {c['skipped_bad']}, duplicates dropped {c['duplicates_dropped']}"
            )
            lines += [f"  skipped: {b}" for b in c["bad_records"][:10]]
            if note := ignored_line(c.get("ignored_files", [])):
                lines.append(f"  {note}")
    for key in ("train", "eval"):
        c = counts[key]
        lines.append(
            f"{key} sequences {c['sequences']}: {c['tokens']} tokens, "
            f"{c['supervised_share']:.0%} in the loss; over-long dropped {c['dropped_too_long']}, "
            f"prompt-truncated {c['truncated_prompt']}"
        )
    if counts.get("augmented_added"):
        lines.append(f"augmentation added {counts['augmented_added']} training records")
    return lines
