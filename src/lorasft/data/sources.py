"""Data that is not JSON: Parquet, CSV and Arrow files, folders written by `datasets`'
`save_to_disk`, and Hub datasets (`hub:owner/name[:split]`) read from the local Hugging Face cache.

Each becomes (source, record) pairs for the same validator as JSON/JSONL (data/formats.py): a
row's source is `file[index]` (Parquet, Arrow, saved datasets: rows counted from 0, as the items
of a JSON array) or `file:line` (CSV: the line the row ends on, as JSONL lines), so a bad row is
located the same way whatever the file. Nothing is downloaded unless `data.allow_download` asks.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lorasft.data.errors import DataError
from lorasft.hub import HUB_PREFIX, hub_snapshot

TABLE_SUFFIXES = (".parquet", ".csv", ".arrow")
# CSV cells are strings; these columns hold lists (turns, history pairs) written as JSON
JSON_COLUMNS = ("messages", "conversations", "history")
CSV_FIELD_LIMIT = 2**31 - 1  # a long document in one cell is data, not an attack on csv


def read_table(path: Path, raw: bytes) -> list[tuple[str, Any]]:
    """The rows of a Parquet, Arrow or CSV file (its bytes `raw`, already checked for encoding)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, raw)
    import pyarrow as pa

    try:
        table = _parquet(raw) if suffix == ".parquet" else _arrow(raw)
    except (pa.ArrowException, OSError, ValueError) as e:
        kind = "Parquet" if suffix == ".parquet" else "Arrow IPC"
        raise DataError(f"{path}: not a readable {kind} file ({_first_line(e)})") from None
    return [(f"{path}[{i}]", row) for i, row in enumerate(table.to_pylist())]


def _parquet(raw: bytes):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(raw))


def _arrow(raw: bytes):
    """An Arrow IPC file, or the stream format `datasets` writes its .arrow shards in."""
    import pyarrow as pa

    try:
        return pa.ipc.open_file(pa.BufferReader(raw)).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.BufferReader(raw)).read_all()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _read_csv(path: Path, raw: bytes) -> list[tuple[str, Any]]:
    """Rows as records keyed by the header; a row with more or fewer cells than the header is a
    record whose problem the validator reports (`<row>`), never shifted into other columns."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}; save it as UTF-8") from None
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError(f"{path}: no header row (the first line names the columns)")
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:
            raise DataError(f"{path}: the header names a column twice: {', '.join(twice)}")
        rows = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            rows.append((f"{path}:{reader.line_num}", _csv_record(header, cells)))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    return rows


def _csv_record(header: list[str], cells: list[str]) -> Any:
    if len(cells) != len(header):
        return CsvShape(len(cells), len(header))
    rec: dict[str, Any] = dict(zip(header, cells))
    for key in JSON_COLUMNS:
        value = rec.get(key)
        if isinstance(value, str) and value.lstrip()[:1] == "[":
            try:
                rec[key] = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                pass  # left a string: the validator says it must be a list
    return rec


class CsvShape:
    """A CSV row whose cell count differs from the header's: the validator's reason."""

    def __init__(self, cells: int, columns: int):
        self.reason = f"the row has {cells} cells, the header {columns} columns"


# ---- folders written by datasets' save_to_disk ------------------------------------------------


def saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def split_of(spec: str) -> tuple[Path, str | None]:
    """`folder:split` -> (folder, split) where `folder` is a saved dataset and `spec` itself is
    not a path; otherwise (the path, None)."""
    head, sep, split = spec.rpartition(":")
    if sep and head and split and not Path(spec).exists() and saved_dataset(Path(head)):
        return Path(head), split
    return Path(spec), None


def read_saved(folder: Path, split: str | None) -> list[tuple[str, Any]]:
    """Rows of a saved Dataset, or of one split of a saved DatasetDict (`split`, or `train`)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise DataError(f"{folder}: not a readable saved dataset ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise DataError(f"{folder}: no split {name!r} (it has {', '.join(ds)}); name one as "
                              f"{folder}:SPLIT")  # fmt: skip
        ds, folder = ds[name], Path(f"{folder}:{name}")
    elif split:
        raise DataError(f"{folder}: a single saved dataset has no splits (asked for {split!r})")
    return [(f"{folder}[{i}]", row) for i, row in enumerate(ds.to_list())]


# ---- Hub datasets from the local cache ---------------------------------------------------------


def is_hub(spec: str) -> bool:
    return spec.startswith(HUB_PREFIX)


def hub_files(spec: str, allow_download: bool = False) -> list[Path]:
    """The data files of one split of `hub:owner/name[:split]` (default split: train), from the
    local Hugging Face cache; the split's files are found by `datasets`' own naming rules."""
    from datasets.data_files import EmptyDatasetError, get_data_patterns

    repo, _, split = spec[len(HUB_PREFIX) :].partition(":")
    split = split or "train"
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise DataError(f"{spec}: a Hub dataset is named hub:OWNER/NAME or hub:OWNER/NAME:SPLIT")
    root = Path(hub_snapshot(repo, "dataset", allow_download, spec, DataError))
    try:
        patterns = get_data_patterns(str(root))
    except EmptyDatasetError as e:
        raise DataError(
            f"{spec}: no data files in its cached copy {root} ({_first_line(e)})"
        ) from None
    if split not in patterns:
        raise DataError(f"{spec}: no split {split!r} in its cached copy (it has "
                          f"{', '.join(patterns)}); name one as hub:{repo}:SPLIT")  # fmt: skip
    files = sorted({Path(f) for p in patterns[split] for f in _matches(p, root)})
    return [f for f in files if f.is_file()]


def _matches(pattern: str, root: Path) -> list[str]:
    """A split's pattern resolved (datasets raises for one of its patterns that matches nothing)."""
    from datasets.data_files import resolve_pattern

    try:
        return resolve_pattern(pattern, str(root))
    except FileNotFoundError:
        return []
