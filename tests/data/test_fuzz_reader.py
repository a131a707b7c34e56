"""Bad data never ends in a traceback: the reader fuzzed for a fixed budget (a fixed seed, so CI
is reproducible; `python bench/fuzz/fuzz.py --minutes N` runs it longer), and the cases found along the
way kept as named tests."""

import json
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings

from lorasft.cli import main
from lorasft.data.formats import DataError, load_files
from tests.data.fuzz_reader import check_folder, files, folders, read_or_refuse
from tests.fuzzing import fuzz_target

BUDGET = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@BUDGET
@given(files)
def test_any_file_is_read_or_refused_by_name(case):
    read_or_refuse(*case)


@BUDGET
@given(files)
def test_named_formats_too(case):
    for fmt in ("alpaca", "chat", "sharegpt", "text"):
        read_or_refuse(*case, fmt=fmt)


def _error(tmp_path, name: str, data: bytes, fmt: str = "auto") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    try:
        load_files([str(path)], fmt, "skip", True)
    except DataError as e:
        return str(e)
    raise AssertionError("no error")


def test_deep_nesting_is_a_located_error_not_a_recursion_error(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    assert "nested too deeply" in _error(tmp_path, "deep.json", deep)
    good = json.dumps({"instruction": "q", "output": "a"}).encode()
    line = b'{"instruction": ' + deep + b"}"
    msg = _error(tmp_path, "deep.jsonl", line + b"\n" + line)
    assert "deep.jsonl:1: <line>: nested too deeply" in msg and "deep.jsonl:2" in msg
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good + b"\n" + deep + b"\n")
    res = load_files([str(path)], "auto", "skip", True)
    assert len(res.examples) == 1 and [str(b) for b in res.bad] == [
        f"{path}:2: <line>: nested too deeply to read (over Python's recursion limit)"
    ]


def test_utf16_and_utf32_files_are_named_not_misread(tmp_path):
    rec = json.dumps({"instruction": "q", "output": "a"}) + "\n"
    for codec, name in [
        ("utf-16", "UTF-16 LE"),
        ("utf-32", "UTF-32 LE"),
        ("utf-16-be", "UTF-16 or UTF-32"),
    ]:
        msg = _error(tmp_path, f"{codec}.jsonl", rec.encode(codec))
        assert f"{codec}.jsonl: the file is encoded as {name}" in msg and "save it as UTF-8" in msg
    # UTF-8 with a BOM is read
    path = tmp_path / "bom.jsonl"
    path.write_bytes(rec.encode("utf-8-sig"))
    assert len(load_files([str(path)], "auto", "skip", True).examples) == 1


def test_format_detection_never_hides_the_located_error(tmp_path):
    bad = b'{"instruction": "q", "output": "a",}\n{"instruction": "r" "output": "b"}\n'
    msg = _error(tmp_path, "bad.jsonl", bad)
    assert "bad.jsonl:1: <line>: malformed JSON" in msg and "bad.jsonl:2" in msg
    assert "bad2.jsonl:1: <line>: malformed JSON" in _error(tmp_path, "bad2.jsonl", bad, "alpaca")


def test_an_empty_text_file_is_a_counted_bad_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = Path("empty.txt")  # no digit in the path: ordering the bad records used to crash
    path.write_text("")
    other = Path("doc.txt")
    other.write_text("some text")
    res = load_files([str(path), str(other)], "auto", "skip", True)
    assert [str(b) for b in res.bad] == [f"{path}: text: empty"] and len(res.examples) == 1


def test_data_check_answers_with_an_error_line(tmp_path, tiny_llama_dir):
    path = tmp_path / "u16.jsonl"
    path.write_bytes((json.dumps({"instruction": "q", "output": "a"}) + "\n").encode("utf-16"))
    args = ["data", "check", str(path), f"model.path={tiny_llama_dir}"]
    out = subprocess.run([sys.executable, "-m", "lorasft.cli", *args], capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: " in out.stderr and "UTF-16 LE" in out.stderr
    assert main(args) == 2


def test_data_check_on_any_folder(tiny_llama_dir):
    """`lorasft data check` on random folders (mixed formats, empty and binary files): checked,
    or an error line naming the file; `bench/fuzz/fuzz.py --targets data-check` runs it for minutes."""
    fuzz_target("data-check", folders(), lambda f: check_folder(f, tiny_llama_dir), examples=60)
