import json
from pathlib import Path

import pytest

from lorasft.data.formats import DataError, ignored_line, load_file, load_files
from tests.conftest import write_jsonl


def test_alpaca_with_input_system_and_history(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{
        "instruction": "Add", "input": "1 2", "output": "3", "system": "Be brief.",
        "history": [["hi", "hello"]],
    }])  # fmt: skip
    [ex], bad, rep = load_file(p)
    assert rep.format == "alpaca" and bad == []
    assert ex.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add\n\n1 2", "instruction": "Add", "input": "1 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert ex.source == f"{p}:1"


def test_alpaca_null_input_is_absent_not_the_text_none(tmp_path):
    p = write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": "Say hi", "input": None, "output": "hi"}]
    )
    [ex], _, _ = load_file(p)
    assert ex.messages[0] == {"role": "user", "content": "Say hi"}
    assert "None" not in json.dumps(ex.messages)


def test_chat_json_array_and_sharegpt(tmp_path):
    chat = tmp_path / "c.json"
    chat.write_text(json.dumps([{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"}]}]))  # fmt: skip
    [ex], _, rep = load_file(chat)
    assert rep.format == "chat" and ex.source == f"{chat}[0]"
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
    share = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}])  # fmt: skip
    [ex], _, rep = load_file(share)
    assert rep.format == "sharegpt"
    assert ex.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_text_format(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "a long document"}])
    [ex], _, rep = load_file(p)
    assert rep.format == "text" and ex.is_text and ex.text == "a long document"


BAD = [
    ({"instruction": "x"}, "output", "missing"),
    ({"instruction": "x", "output": None}, "output", "null where a string is required"),
    ({"instruction": 5, "output": "y"}, "instruction", "must be a string, got int"),
    ({"instruction": "x", "output": "   "}, "output", "empty response"),
    ({"instruction": "x", "output": "y", "input": ["a"]}, "input", "must be a string, got list"),
    (
        {"instruction": "x", "output": "y", "history": [["only one"]]},
        "history[0]",
        "must be a pair",
    ),
]


@pytest.mark.parametrize("record,field,reason", BAD)
def test_bad_alpaca_records_name_line_field_and_reason(tmp_path, record, field, reason):
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "ok", "output": "fine"}, record])
    examples, bad, _ = load_file(p, "alpaca")
    assert len(examples) == 1 and len(bad) == 1
    assert bad[0].source == f"{p}:2" and bad[0].field == field and reason in bad[0].reason


def test_bad_chat_roles(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": "Q"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 3}]},
        {"messages": "not a list"},
    ])  # fmt: skip
    _, bad, _ = load_file(p, "chat")
    assert [(b.field, b.reason) for b in bad] == [
        ("messages[0].role", "expected 'user', got 'assistant'"),
        ("messages", "the last turn must be the assistant's response"),
        ("messages[1].content", "must be a string, got int"),
        ("messages", "must be a non-empty list of turns"),
    ]


def test_malformed_json_line_and_invalid_utf8_are_counted(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "a", \n'
                  b'{"instruction": "\xff\xfe", "output": "b"}\n')  # fmt: skip
    examples, bad, _ = load_file(p)
    assert len(examples) == 1
    assert [(b.source, b.reason.split(":")[0]) for b in bad] == [
        (f"{p}:2", "malformed JSON"),
        (f"{p}:3", "invalid UTF-8 at byte 17"),
    ]


def test_bom_and_crlf_are_handled_and_counted(tmp_path):
    p = tmp_path / "b.jsonl"
    rec = json.dumps({"instruction": "line1\r\nline2", "output": "ok"})
    p.write_bytes(b"\xef\xbb\xbf" + rec.encode() + b"\r\n")
    [ex], bad, rep = load_file(p)
    assert bad == [] and rep.bom and rep.crlf_records == 1
    assert ex.messages[0]["content"] == "line1\nline2"


def test_broken_json_array_names_file_and_position(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": ]')
    with pytest.raises(DataError, match=r"x.json: malformed JSON at line 2 column 18"):
        load_file(p)


def test_policy_error_lists_records_and_skip_counts_them(tmp_path):
    p = write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}]
    )
    with pytest.raises(
        DataError, match=r"(?s)1 bad record.*on_bad_record=skip.*a.jsonl:2: output: missing"
    ):
        load_files([str(p)], "auto", "error", True)
    res = load_files([str(p)], "auto", "skip", True)
    assert len(res.examples) == 1 and len(res.bad) == 1


def test_duplicates_dropped_and_counted(tmp_path):
    rec = {"instruction": "a", "output": "b"}
    p = write_jsonl(tmp_path / "d.jsonl", [rec, rec, {"instruction": "c", "output": "d"}])
    res = load_files([str(p)], "auto", "error", dedup=True)
    assert len(res.examples) == 2 and res.duplicates == 1


def test_undetectable_format_and_missing_file(tmp_path):
    p = write_jsonl(tmp_path / "u.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match="cannot detect the format.*set data.format"):
        load_file(p)
    with pytest.raises(DataError, match="data file not found"):
        load_file(tmp_path / "nope.jsonl")


def test_a_folder_reads_its_data_files_each_in_its_own_format(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}]))  # fmt: skip
    (tmp_path / "sub" / "c.txt").write_text("a document")
    (tmp_path / "notes.pdf").write_text("x,y")
    (tmp_path / ".hidden.jsonl").write_text("not read")
    res = load_files([str(tmp_path)], "auto", "skip", True)
    assert [(Path(f.path).name, f.format, f.records) for f in res.files] == [
        ("a.jsonl", "alpaca", 1), ("b.json", "chat", 1), ("c.txt", "text", 1)]  # fmt: skip
    assert res.ignored == [str(tmp_path / "notes.pdf")]  # counted and shown, not lost
    assert ignored_line(res.ignored) == (
        "not read (in a data folder, not .json/.jsonl/.txt/.md/.parquet/.csv/.arrow): 1: "
        f"{tmp_path / 'notes.pdf'}"
    )


def test_a_folder_without_data_files_is_an_error_naming_it(tmp_path):
    (tmp_path / "notes.pdf").write_text("x,y")
    with pytest.raises(DataError, match=rf"^{tmp_path}: a folder with no data files"):
        load_files([str(tmp_path)], "auto", "skip", True)
