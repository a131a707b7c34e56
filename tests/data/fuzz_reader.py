"""The data reader's fuzzing target, shared by tests/data/test_fuzz_reader.py (a small fixed
budget in `make test`) and bench/fuzz/fuzz.py (minutes): files built from random bytes and from
random records of every format (wrong types in every field, deep nesting, control characters,
encodings and BOMs, CRLF, empty and huge lines; CSV grids with any cells, Parquet and Arrow
tables with any columns), each read by `load_files` as `lorasft train` and
`lorasft data check` read them. The property: the file is read (its records usable or counted as
bad, each located), or it is refused with a `DataError` that names the file; never another
exception, never a hang."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import strategies as st

from lorasft.data.formats import DataError, load_files

KEYS = ["instruction", "input", "output", "system", "history", "messages", "conversations",
        "text", "role", "content", "from", "value"]  # fmt: skip
ROLES = ["system", "user", "assistant", "human", "gpt", "robot", ""]
SUFFIXES = [".jsonl", ".json", ".txt"]
TABLES = [".csv", ".parquet", ".arrow"]
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1"]

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", " ", "\r\n", "\x00", "\u2028", "<|im_end|>", "答案", "\ufeff"]
)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | text, inner, max_size=4)
    ),
    max_leaves=12,
)
turn = st.fixed_dictionaries(
    {},
    optional={"role": st.sampled_from(ROLES) | scalars, "content": json_values,
              "from": st.sampled_from(ROLES), "value": json_values},
)  # fmt: skip
record = (
    st.fixed_dictionaries({}, optional={k: json_values for k in ("instruction", "input", "output", "system")})
    | st.fixed_dictionaries({"messages": st.lists(turn, max_size=4) | json_values})
    | st.fixed_dictionaries({"conversations": st.lists(turn, max_size=4) | json_values})
    | st.fixed_dictionaries({"text": json_values})
    | json_values
)  # fmt: skip


@st.composite
def record_files(draw) -> tuple[str, bytes]:
    """(suffix, bytes): random records as JSONL or a JSON array, in a random encoding."""
    records = draw(st.lists(record, max_size=5))
    as_array = draw(st.booleans())
    body = (json.dumps(records, ensure_ascii=draw(st.booleans())) if as_array else
            "\n".join(json.dumps(r, ensure_ascii=draw(st.booleans())) for r in records))  # fmt: skip
    if draw(st.booleans()):
        body = body.replace("\n", "\r\n")
    extra = draw(st.sampled_from(["", "\n\n", "{broken", "[" * 3000, "\x00", "x" * 70_000]))
    body += draw(st.sampled_from(["", "\n"])) + extra
    data = body.encode(draw(st.sampled_from(ENCODINGS)), errors="replace")
    return draw(st.sampled_from(SUFFIXES[:2])), data


byte_files = st.tuples(st.sampled_from(SUFFIXES + TABLES), st.binary(max_size=512))


@st.composite
def csv_files(draw) -> tuple[str, bytes]:
    """A header of record keys or any text (repeated names too) and rows of any cells: text,
    JSON of any value (a `messages` cell holds JSON), ragged rows; in any encoding."""
    header = draw(st.lists(st.sampled_from(KEYS) | text, min_size=0, max_size=4))
    cells = text | json_values.map(json.dumps)
    rows = draw(st.lists(st.lists(cells, max_size=5), max_size=5))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return ".csv", buf.getvalue().encode(draw(st.sampled_from(ENCODINGS)), errors="replace")


@st.composite
def arrow_tables(draw) -> tuple[str, bytes]:
    """Parquet or Arrow IPC: 0-5 rows of record keys as columns, each column of one type
    (text or null, integers, lists of text, structs of role/content)."""
    n = draw(st.integers(0, 5))
    column = st.sampled_from([
        st.lists(text | st.none(), min_size=n, max_size=n),
        st.lists(st.integers(-(2**40), 2**40) | st.none(), min_size=n, max_size=n),
        st.lists(st.lists(text, max_size=3), min_size=n, max_size=n),
        st.lists(st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": text}),
                          max_size=3), min_size=n, max_size=n),
    ]).flatmap(lambda s: s)  # fmt: skip
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True))
    table = pa.table({k: draw(column) for k in keys})
    sink = pa.BufferOutputStream()
    if draw(st.booleans()):
        pq.write_table(table, sink)
        return ".parquet", sink.getvalue().to_pybytes()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return ".arrow", sink.getvalue().to_pybytes()


deep_files = st.builds(
    lambda depth, wrap: (".json" if wrap else ".jsonl", ("[" * depth + "]" * depth).encode()),
    st.integers(1, 200_000),
    st.booleans(),
)
files = record_files() | byte_files | deep_files | csv_files() | arrow_tables()


def read_or_refuse(suffix: str, data: bytes, fmt: str = "auto") -> str:
    """Write the file and read it; 'read' or 'refused'. Anything but a DataError naming the file
    propagates (the fuzzers' failure)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(data)
        try:
            res = load_files([str(path)], fmt, "skip", True)
        except DataError as e:
            assert str(path) in str(e), f"the error does not name the file: {e}"
            return "refused"
        for bad in res.bad:  # every bad record located in this file, with a reason
            assert bad.source.startswith(str(path)) and bad.reason, bad
        assert res.examples and all(ex.is_text or ex.messages for ex in res.examples)
        return "read"


words = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1,
                max_size=30).filter(str.strip)  # fmt: skip
good_records = (
    st.fixed_dictionaries({"instruction": words, "output": words}, optional={"input": words})
    | st.builds(lambda q, a: {"messages": [{"role": "user", "content": q},
                                           {"role": "assistant", "content": a}]}, words, words)
)  # fmt: skip
good_files = st.lists(good_records, min_size=1, max_size=4).map(
    lambda rs: (".jsonl", "".join(json.dumps(r) + "\n" for r in rs).encode())
) | words.map(lambda t: (".txt", t.encode()))
"""Files that are read whole: valid alpaca or chat records, or a text document."""


@st.composite
def folders(draw) -> list[tuple[str, bytes]]:
    """(name, bytes) of 1-4 files for one folder: mixed formats, suffixes and encodings, empty
    and binary files among them."""
    any_file = files | st.just((".jsonl", b"")) | st.just((".txt", b""))
    picked = draw(st.lists(good_files | good_files | any_file, min_size=1, max_size=4))
    return [(f"f{i}{suffix}", data) for i, (suffix, data) in enumerate(picked)]


def check_folder(folder: list[tuple[str, bytes]], model_dir: Path) -> int:
    """`lorasft data check DIR` on the folder, in this process: its exit code, 0 (clean), 1 (the
    report lists the bad records, each located in a file of the folder) or 2 (an `error:` line
    naming a file of the folder, or the folder); anything else, an exception above all,
    propagates (the fuzzers' failure)."""
    import contextlib
    import io

    from lorasft.cli import main

    with tempfile.TemporaryDirectory() as d:
        for name, data in folder:
            (Path(d) / name).write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(["data", "check", d, f"model.path={model_dir}", "data.val_ratio=0"])
    errors = [x for x in err.getvalue().splitlines() if x.startswith("error: ")]
    report = out.getvalue().splitlines()
    bad = next((int(x.split(": ")[1]) for x in report if x.startswith("bad records: ")), None)
    assert code in (0, 1, 2), (code, err.getvalue()[-2000:])
    if code == 2:
        assert errors and d in errors[0], err.getvalue()[-2000:]
    elif code == 1:
        listed = report[report.index(f"bad records: {bad}") + 1 :][: min(bad, 50)]
        assert bad and all(x.startswith(f"  {d}/") for x in listed), out.getvalue()[-2000:]
    else:
        assert bad == 0 and not errors, out.getvalue()[-2000:]
    return code
