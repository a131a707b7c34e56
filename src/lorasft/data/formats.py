"""Read data files (JSON / JSONL / text here; Parquet, CSV, Arrow, saved datasets and Hub
datasets through data/sources.py) and normalise alpaca, chat, ShareGPT and raw-text records.

Every record becomes an `Example`: either a conversation (`messages`, roles system/user/assistant)
or a raw `text`. A record that cannot be used becomes a `BadRecord` naming file, line or index,
field and reason; nothing is coerced (`None` never becomes the text "None").
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasft.data.errors import DataError
from lorasft.data.sources import (
    TABLE_SUFFIXES,
    CsvShape,
    hub_files,
    is_hub,
    read_saved,
    read_table,
    saved_dataset,
    split_of,
)

TEXT_SUFFIXES = (".txt", ".md")
# what a folder given as data contributes
DATA_SUFFIXES = (".json", ".jsonl", *TEXT_SUFFIXES, *TABLE_SUFFIXES)
# byte-order marks of the encodings that are not UTF-8 (UTF-32's first: it starts as UTF-16's)
OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32 LE"), (b"\x00\x00\xfe\xff", "UTF-32 BE"),
              (b"\xff\xfe", "UTF-16 LE"), (b"\xfe\xff", "UTF-16 BE"))  # fmt: skip
TOO_DEEP = "nested too deeply to read (over Python's recursion limit)"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant"}  # fmt: skip


__all__ = ["DataError"]  # raised by every reader; imported from here by the rest of lorasft


@dataclass(frozen=True)
class Saved:
    """A folder written by `datasets`' save_to_disk (and the split to read of a DatasetDict)."""

    folder: Path
    split: str | None = None

    def __str__(self) -> str:
        return f"{self.folder}:{self.split}" if self.split else str(self.folder)


@dataclass
class Example:
    source: str  # "file:line" or "file[index]"
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None

    @property
    def is_text(self) -> bool:
        return self.text is not None

    def key(self) -> str:
        return json.dumps([self.messages, self.text], ensure_ascii=False, sort_keys=True)


@dataclass
class BadRecord:
    source: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.field}: {self.reason}"


@dataclass
class FileReport:
    path: str
    format: str
    records: int = 0
    bom: bool = False
    crlf_records: int = 0


@dataclass
class LoadResult:
    examples: list[Example] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    files: list[FileReport] = field(default_factory=list)
    duplicates: int = 0
    ignored: list[str] = field(default_factory=list)
    """Files inside folders given as data that were not read (other suffixes)."""


def read_records(path: Path | Saved) -> tuple[list[tuple[str, Any]], list[BadRecord], bool]:
    """(source, parsed object) pairs of a JSON array or JSONL file (or a table, a saved dataset),
    the lines that did not parse, and whether a UTF-8 BOM was stripped."""
    if isinstance(path, Saved):
        return read_saved(path.folder, path.split), [], False
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    raw = path.read_bytes()
    if path.suffix.lower() in (".parquet", ".arrow"):  # binary: no text encoding to check
        return read_table(path, raw), [], False
    check_encoding(path, raw)
    bom = raw.startswith(b"\xef\xbb\xbf")
    raw = raw[3:] if bom else raw
    if path.suffix.lower() == ".csv":
        return read_table(path, raw), [], bom
    if path.suffix.lower() in TEXT_SUFFIXES:  # a plain text file is one raw-text document
        return [(str(path), {"text": _decode(path, raw)})], [], bom
    if raw.lstrip()[:1] == b"[":
        return _read_json_array(path, raw), [], bom
    records, bad = [], []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        src = f"{path}:{n}"
        if not line.strip():
            continue
        try:
            records.append((src, json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError as e:
            bad.append(BadRecord(src, "<line>", f"invalid UTF-8 at byte {e.start}"))
        except json.JSONDecodeError as e:
            bad.append(BadRecord(src, "<line>", f"malformed JSON: {e.msg} at column {e.colno}"))
        except RecursionError:
            bad.append(BadRecord(src, "<line>", TOO_DEEP))
    return records, bad, bom


def check_encoding(path: Path, raw: bytes) -> None:
    """UTF-8 (with or without BOM) is read; a file in UTF-16 or UTF-32 (a BOM, or the NUL bytes
    of ASCII text in them) is an error naming the encoding, never misread as records."""
    found = next((name for bom, name in OTHER_BOMS if raw.startswith(bom)), None)
    head = raw[:2048]
    if found is None and len(head) >= 4 and head.count(0) * 3 >= len(head):
        found = "UTF-16 or UTF-32 (no byte-order mark)"  # ASCII in them is every 2nd/4th byte NUL
    if found:
        raise DataError(f"{path}: the file is encoded as {found}; lorasft reads UTF-8: save it as "
                        "UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")  # fmt: skip


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}; save the file as UTF-8") from e


def _read_json_array(path: Path, raw: bytes) -> list[tuple[str, Any]]:
    text = _decode(path, raw)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from e
    except RecursionError:
        raise DataError(f"{path}: {TOO_DEEP}") from None
    return [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]


def detect_format(records: list[tuple[str, Any]], path: Path,
                  bad: list[BadRecord] | None = None) -> str:  # fmt: skip
    for _, rec in records:
        if not isinstance(rec, dict):
            continue
        if "messages" in rec:
            return "chat"
        if "conversations" in rec:
            return "sharegpt"
        if "instruction" in rec or "output" in rec:
            return "alpaca"
        if "text" in rec:
            return "text"
    if bad and not any(isinstance(rec, dict) for _, rec in records):  # nothing parsed: say why
        raise DataError(f"{path}: cannot detect the format: no record could be read; the first "
                        f"bad one: {bad[0]}{_listed(bad[1:], 4)}")  # fmt: skip
    raise DataError(
        f"{path}: cannot detect the format: no record has 'instruction'/'output' (alpaca), "
        "'messages' (chat), 'conversations' (ShareGPT) or 'text'; set data.format"
    )


def _string(rec: dict, key: str, required: bool) -> str | None:
    """A string field, or None when optional and absent/null; raises with the reason otherwise."""
    value = rec.get(key)
    if value is None:
        if required:
            raise _Bad(key, "missing" if key not in rec else "null where a string is required")
        return None
    if not isinstance(value, str):
        raise _Bad(key, f"must be a string, got {type(value).__name__}")
    return value


class _Bad(Exception):
    def __init__(self, field_name: str, reason: str):
        self.field, self.reason = field_name, reason


def _alpaca(rec: dict) -> list[dict[str, str]]:
    instruction = _string(rec, "instruction", required=True)
    output = _string(rec, "output", required=True)
    inp = _string(rec, "input", required=False) or ""
    system = _string(rec, "system", required=False)
    if not instruction.strip():
        raise _Bad("instruction", "empty")
    messages = [{"role": "system", "content": system}] if system else []
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise _Bad(
            "history",
            f"must be a list of [instruction, response] pairs, got {type(history).__name__}",
        )
    for i, pair in enumerate(history):
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        ):
            raise _Bad(f"history[{i}]", "must be a pair of strings [instruction, response]")
        messages += [
            {"role": "user", "content": pair[0]},
            {"role": "assistant", "content": pair[1]},
        ]
    user = {"role": "user", "content": instruction + (f"\n\n{inp}" if inp else "")}
    if inp:  # kept apart for templates (alpaca) that render the input in its own block
        user.update(instruction=instruction, input=inp)
    return messages + [user, {"role": "assistant", "content": output}]


def _chat(rec: dict, key: str, role_key: str, text_key: str, roles: dict | None) -> list[dict]:
    turns = rec.get(key)
    if not isinstance(turns, list) or not turns:
        raise _Bad(key, "must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Bad(f"{key}[{i}]", f"must be an object, got {type(turn).__name__}")
        role, content = turn.get(role_key), turn.get(text_key)
        if not isinstance(role, str):
            raise _Bad(f"{key}[{i}].{role_key}", "missing or not a string")
        role = roles.get(role.lower(), role) if roles else role
        if not isinstance(content, str):
            raise _Bad(f"{key}[{i}].{text_key}", f"must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def check_conversation(messages: list[dict[str, str]], key: str = "messages") -> None:
    """Optional system first, then user/assistant alternating, ending with a non-empty answer."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise _Bad(key, "no user/assistant turns")
    for i, msg in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise _Bad(f"{key}[{i}].role", f"expected '{expected}', got '{msg['role']}'")
    if messages[-1]["role"] != "assistant":
        raise _Bad(key, "the last turn must be the assistant's response")
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise _Bad(f"{key}[{i}].content" if key != "output" else "output", "empty response")


def normalise(rec: Any, fmt: str) -> Example:
    if not isinstance(rec, dict):
        raise _Bad("<record>", f"must be a JSON object, got {type(rec).__name__}")
    if fmt == "text":
        text = _string(rec, "text", required=True)
        if not text.strip():
            raise _Bad("text", "empty")
        return Example(source="", text=text)
    if fmt == "alpaca":
        messages, key = _alpaca(rec), "output"
    elif fmt == "chat":
        messages, key = _chat(rec, "messages", "role", "content", None), "messages"
    else:
        messages, key = (
            _chat(rec, "conversations", "from", "value", SHAREGPT_ROLES),
            "conversations",
        )
    check_conversation(messages, key)
    return Example(source="", messages=messages)


def _fix_crlf(ex: Example) -> bool:
    changed = False
    if ex.text is not None and "\r" in ex.text:
        ex.text, changed = ex.text.replace("\r\n", "\n"), True
    for msg in ex.messages:
        for k, v in msg.items():
            if k != "role" and "\r" in v:
                msg[k], changed = v.replace("\r\n", "\n"), True
    return changed


def load_file(
    path: str | Path | Saved, fmt: str = "auto"
) -> tuple[list[Example], list[BadRecord], FileReport]:
    path = path if isinstance(path, Saved) else Path(path)
    records, bad, bom = read_records(path)
    if not records and not bad:
        raise DataError(f"{path}: no records")
    fmt = detect_format(records, path, bad) if fmt == "auto" else fmt
    report = FileReport(str(path), fmt, bom=bom)
    examples = []
    for src, rec in records:
        if isinstance(rec, CsvShape):
            bad.append(BadRecord(src, "<row>", rec.reason))
            continue
        try:
            ex = normalise(rec, fmt)
        except _Bad as b:
            bad.append(BadRecord(src, b.field, b.reason))
            continue
        ex.source = src
        report.crlf_records += _fix_crlf(ex)
        examples.append(ex)
    report.records = len(examples)
    bad.sort(key=_position)  # file order
    return examples, bad, report


def _position(b: BadRecord) -> int:
    """A bad record's line or index in its file ("f.jsonl:7", "f.json[3]"); 0 for a whole file."""
    m = re.search(r"(?::(\d+)|\[(\d+)\])$", b.source)
    return int(m.group(1) or m.group(2)) if m else 0


def expand_paths(
    paths: list[str], allow_download: bool = False
) -> tuple[list[Path | Saved], list[str]]:
    """The files to read: `hub:owner/name[:split]` becomes the split's files in the local Hugging
    Face cache; a folder written by save_to_disk (`folder` or `folder:split`) is read as one; any
    other folder becomes the data files under it (recursively, in name order, hidden ones left
    out, saved datasets inside it read as such), each with its own format; its other files are
    returned as ignored."""
    out: list[Path | Saved] = []
    ignored: list[str] = []
    for spec in paths:
        if is_hub(spec):
            out += hub_files(spec, allow_download)
            continue
        p, split = split_of(spec)
        if p.is_dir() and (split or saved_dataset(p)):
            out.append(Saved(p, split))
        elif p.is_dir():
            data, other = _folder_data(p)
            out += data
            ignored += other
        else:
            out.append(p)
    return out, ignored


def _folder_data(p: Path) -> tuple[list[Path | Saved], list[str]]:
    def shown(f: Path) -> bool:  # hidden files and folders are left out
        return not any(part.startswith(".") for part in f.relative_to(p).parts)

    saved = [d for d in p.rglob("*") if d.is_dir() and shown(d) and saved_dataset(d)]
    saved = [d for d in saved if not any(s in d.parents for s in saved)]  # the outermost
    found = sorted(f for f in p.rglob("*") if f.is_file() and shown(f)
                   and not any(d in f.parents for d in saved))  # fmt: skip
    data = [f for f in found if f.suffix.lower() in DATA_SUFFIXES]
    if not data and not saved:
        raise DataError(f"{p}: a folder with no data files (read: {', '.join(DATA_SUFFIXES)})")
    every: list[Path | Saved] = [*data, *(Saved(d) for d in saved)]
    return sorted(every, key=str), [str(f) for f in found if f.suffix.lower() not in DATA_SUFFIXES]


def ignored_line(ignored: list[str], limit: int = 5) -> str | None:
    """The console's note on files in data folders that were not read (None: there were none)."""
    if not ignored:
        return None
    more = f" and {len(ignored) - limit} more" if len(ignored) > limit else ""
    return (f"not read (in a data folder, not {'/'.join(DATA_SUFFIXES)}): {len(ignored)}: "
            f"{', '.join(ignored[:limit])}{more}")  # fmt: skip


def load_files(paths: list[str], fmt: str, on_bad_record: str, dedup: bool,
               allow_download: bool = False) -> LoadResult:  # fmt: skip
    result = LoadResult()
    files, result.ignored = expand_paths(paths, allow_download)
    for p in files:
        examples, bad, report = load_file(p, fmt)
        result.examples += examples
        result.bad += bad
        result.files.append(report)
    if result.bad and on_bad_record == "error":
        raise DataError(
            f"{len(result.bad)} bad record(s) (set data.on_bad_record=skip to skip and count them):"
            + _listed(result.bad)
        )
    if dedup:
        result.examples, result.duplicates = drop_duplicates(result.examples)
    if not result.examples:
        why = f"; every record was bad:{_listed(result.bad)}" if result.bad else ""
        raise DataError(f"no usable records in {', '.join(paths)}{why}")
    return result


def _listed(bad: list, limit: int = 20) -> str:
    """The first bad records (file:line: field: reason), one per line, and how many more."""
    shown = "".join(f"\n  {b}" for b in bad[:limit])
    return shown + (f"\n  ... and {len(bad) - limit} more" if len(bad) > limit else "")


def drop_duplicates(examples: list[Example]) -> tuple[list[Example], int]:
    seen: Counter[str] = Counter()
    kept = []
    for ex in examples:
        k = ex.key()
        seen[k] += 1
        if seen[k] == 1:
            kept.append(ex)
    return kept, len(examples) - len(kept)
