"""Long documents for evaluation by length: the user's files, else the text the package ships.

Documents are tokenized and joined with EOS between them, never repeated to fill a length: a
model that has seen a passage earlier in its window can copy it, which flatters perplexity.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from lorasft.data.formats import DataError


def shipped_text_path() -> Path:
    return Path(str(files("lorasft") / "assets" / "long_text.txt"))


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise DataError(f"{path}:{n}: a long-text record needs a string field 'text'")
        texts.append(rec["text"])
    return texts


def read_documents(paths: list[str | Path] | None) -> list[str]:
    """Text files are one document each; JSONL files hold one document per record (`text`)."""
    docs: list[str] = []
    for p in [Path(x) for x in paths] if paths else [shipped_text_path()]:
        if not p.is_file():
            raise DataError(
                f"--long-data: {p} does not exist (give text files or JSONL with 'text')"
            )
        if p.suffix.lower() in (".jsonl", ".json"):
            docs += _jsonl_texts(p)
        else:
            docs.append(p.read_text(encoding="utf-8"))
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no long text found in {', '.join(map(str, paths or []))}")
    return docs


def token_stream(docs: list[str], tok) -> list[int]:
    """All documents as one token sequence, EOS between documents."""
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        ids += tok(doc, add_special_tokens=False).input_ids
    return ids
