"""Long documents for evaluation by length: the user's files, else the text the package ships.

Documents are tokenized and joined with EOS between them, never repeated to fill a length: a
model that has seen a passage earlier in its window can copy it, which flatters perplexity.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from lorasft.data.formats import DataError, load_file
from lorasft.data.tokenize import document_stream


def shipped_text_path() -> Path:
    return Path(str(files("lorasft") / "assets" / "long_text.txt"))


def read_documents(paths: list[str | Path] | None) -> list[str]:
    """Text files are one document each; JSON/JSONL files hold one document per record (`text`)."""
    docs: list[str] = []
    for p in [Path(x) for x in paths] if paths else [shipped_text_path()]:
        examples, bad, _ = load_file(p, "text")
        if bad:
            raise DataError(f"--long-data: {bad[0]} (a long-text record needs a string 'text')")
        docs += [ex.text.strip() for ex in examples if ex.text.strip()]
    if not docs:
        raise DataError(f"no long text found in {', '.join(map(str, paths or []))}")
    return docs


def token_stream(docs: list[str], tok) -> list[int]:
    """All documents as one token sequence, each ending with EOS (the training windows' rule)."""
    return document_stream(docs, tok)
