"""Long real text for training and evaluating past the window, built on this machine from
Python's own documentation (nothing downloaded, nothing written by us):

- training (`kind="pydoc"`): the documentation of standard-library modules as `pydoc` renders it
  from their docstrings (one document per module, 5k to 60k tokens each); or (`kind="source"`)
  the Python source code of the same modules (one document per file): code, not prose, so that
  evaluating on the reference's prose measures what training added beyond the text's domain;
- evaluation: the Python language reference topics that every CPython install carries
  (`pydoc_data.topics`), a different text from a different source, joined in a fixed order.

    python bench/long_context/long_corpus.py OUT_DIR    # writes train.jsonl and eval.jsonl ({"text": ...})
"""

from __future__ import annotations

import argparse
import importlib
import json
import pydoc
from pathlib import Path

# Modules whose rendered documentation is long prose-and-signature text; tkinter and turtle are
# left out (hundreds of widgets inheriting the same methods: mostly repetition).
TRAIN_MODULES = (
    "argparse", "asyncio.events", "calendar", "codecs", "collections", "concurrent.futures",
    "configparser", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest",
    "email.message", "enum", "ftplib", "functools", "http.client", "imaplib", "inspect",
    "ipaddress", "itertools", "json", "logging", "mailbox", "numbers", "optparse", "os",
    "pathlib", "pdb", "pickle", "queue", "random", "re", "selectors", "shelve", "shutil",
    "smtplib", "socket", "sqlite3", "ssl", "statistics", "subprocess", "tarfile", "tempfile",
    "threading", "tracemalloc", "typing", "unittest.case", "urllib.request", "uuid", "wave",
    "weakref", "xml.etree.ElementTree", "xmlrpc.client", "zipfile",
)  # fmt: skip


def module_documents() -> list[str]:
    docs = []
    for name in TRAIN_MODULES:
        text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        docs.append(text.strip())
    return docs


def source_documents() -> list[str]:
    import inspect

    modules = [importlib.import_module(name) for name in TRAIN_MODULES]
    return [inspect.getsource(m).strip() for m in modules if getattr(m, "__file__", None)]


def reference_documents() -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def write(out: Path, kind: str = "pydoc") -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "eval.jsonl"
    train = source_documents() if kind == "source" else module_documents()
    for path, docs in zip(paths, (train, reference_documents())):
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return paths


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", choices=["pydoc", "source"], default="pydoc")
    a = p.parse_args()
    for path in write(a.out, a.train):
        print(path, path.stat().st_size, "bytes")
