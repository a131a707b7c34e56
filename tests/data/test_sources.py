"""Parquet, CSV, Arrow, save_to_disk folders and Hub ids (data/sources.py, hub.py): the same
records as the JSONL they were written from, bad rows located, missing Hub ids named."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants

from lorasft.config import load_config
from lorasft.data.formats import DataError, expand_paths, load_file, load_files
from lorasft.data.prepare import demo_files
from lorasft.model.load import ModelError, resolve_model_path

COLUMNS = ("instruction", "input", "output")


def demo_rows() -> list[dict]:
    """The demo's 240 training records, every column present (CSV has no missing cells)."""
    lines = Path(demo_files()[0]).read_text(encoding="utf-8").splitlines()
    return [{k: json.loads(line).get(k, "") for k in COLUMNS} for line in lines]


def messages(result) -> list:
    return [ex.messages for ex in result.examples]


@pytest.fixture(scope="module")
def want() -> list:
    return messages(load_files([demo_files()[0]], "auto", "error", False))


def write_csv(path: Path, rows: list[dict], header=COLUMNS) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(header))
        w.writeheader()
        w.writerows(rows)
    return path


def test_demo_as_parquet_csv_arrow_and_saved_datasets_reads_the_same_240_records(tmp_path, want):
    rows = demo_rows()
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "demo.parquet")
    with (
        pa.OSFile(str(tmp_path / "demo.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as w,
    ):
        w.write_table(table)
    write_csv(tmp_path / "demo.csv", rows)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert len(want) == 240
    for spec in ("demo.parquet", "demo.arrow", "demo.csv", "saved", "dict", "dict:train"):
        res = load_files([str(tmp_path / spec)], "auto", "error", False)
        assert messages(res) == want, spec
        assert res.files[0].format == "alpaca" and res.files[0].records == 240
    assert len(load_files([str(tmp_path / "dict:test")], "auto", "error", False).examples) == 5
    # a folder of them: each read in its own format, the saved datasets as datasets
    res = load_files([str(tmp_path)], "auto", "error", False)
    names = [Path(f.path).name for f in res.files]
    assert names == ["demo.arrow", "demo.csv", "demo.parquet", "dict", "saved"]
    assert len(res.examples) == 240 * 5 and res.ignored == []


def test_a_bad_parquet_row_is_located_by_file_and_row(tmp_path):
    rows = demo_rows()[:10]
    rows[7]["output"] = None
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples, bad, _ = load_file(path)
    assert [str(b) for b in bad] == [f"{path}[7]: output: null where a string is required"]
    assert len(examples) == 9 and examples[0].source == f"{path}[0]"
    with pytest.raises(DataError, match=r"(?s)1 bad record.*bad\.parquet\[7\]: output: null"):
        load_files([str(path)], "auto", "error", False)


def test_parquet_types_are_checked_not_coerced(tmp_path):
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": [1, 2]}), path)
    _, bad, _ = load_file(path)
    assert [str(b) for b in bad] == [f"{path}[{i}]: output: must be a string, got int"
                                     for i in (0, 1)]  # fmt: skip


def test_csv_rows_are_located_by_line_and_chat_cells_hold_json(tmp_path):
    path = tmp_path / "chat.csv"
    good = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\nb"}])
    path.write_text(
        "messages,note\n"
        f'"{good.replace(chr(34), chr(34) * 2)}",x\n'  # line 2
        '"[{""role"": ""user"", \n""content"": ""two lines""}]",y\n'  # lines 3-4: no answer
        "only-one-cell\n"  # line 5
        "not json,z\n",  # line 6
        encoding="utf-8",
    )
    examples, bad, report = load_file(path)
    assert report.format == "chat" and len(examples) == 1
    assert examples[0].messages[1]["content"] == "a\nb" and examples[0].source == f"{path}:2"
    assert [str(b) for b in bad] == [
        f"{path}:4: messages: the last turn must be the assistant's response",
        f"{path}:5: <row>: the row has 1 cells, the header 2 columns",
        f"{path}:6: messages: must be a non-empty list of turns",
    ]


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("x.parquet", b"PAR1 not really", r"x\.parquet: not a readable Parquet file"),
        ("x.arrow", b"\x00" * 64, r"x\.arrow: not a readable Arrow IPC file"),
        ("x.csv", b"a,a\n1,2\n", r"x\.csv: the header names a column twice: a"),
        ("x.csv", b"\n\n", r"x\.csv: no header row"),
        ("x.csv", b"a,b\n\xff,1\n", r"x\.csv: invalid UTF-8 at byte"),
    ],
)
def test_unreadable_tables_are_errors_naming_the_file(tmp_path, name, data, match):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=match):
        load_file(tmp_path / name)


def fake_hub(root: Path, kind: str, repo: str, files: dict[str, bytes | Path]) -> Path:
    """A Hugging Face cache entry as `hf download` leaves it: refs/main -> a snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"{kind}s--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snap = entry / "snapshots" / commit
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            (snap / name).write_bytes(data.read_bytes())
        else:
            (snap / name).write_bytes(data)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def test_hub_datasets_come_from_the_local_cache_by_split(hub_cache, tmp_path, want):
    pq.write_table(pa.Table.from_pylist(demo_rows()), tmp_path / "t.parquet")
    test_rows = "".join(json.dumps(r) + "\n" for r in demo_rows()[:3]).encode()
    fake_hub(hub_cache, "dataset", "me/toy", {"data/train-00000-of-00001.parquet": tmp_path / "t.parquet",
                                             "data/test-00000-of-00001.jsonl": test_rows,
                                             "README.md": b"# toy\n"})  # fmt: skip
    assert messages(load_files(["hub:me/toy"], "auto", "error", False)) == want
    assert messages(load_files(["hub:me/toy:train"], "auto", "error", False)) == want
    assert len(load_files(["hub:me/toy:test"], "auto", "error", False).examples) == 3
    with pytest.raises(DataError, match=r"hub:me/toy:dev: no split 'dev'.*it has train, test"):
        expand_paths(["hub:me/toy:dev"])
    with pytest.raises(DataError, match=r"hub:me/gone: not in the local Hugging Face cache "
                       r".*`hf download me/gone --repo-type dataset`.*data.allow_download"):  # fmt: skip
        expand_paths(["hub:me/gone"])
    with pytest.raises(DataError, match="hub:OWNER/NAME"):
        expand_paths(["hub:nothing"])
    # a config keeps the id as written (a path would be resolved against the file's folder)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: {train_file: 'hub:me/toy', eval_file: 'hub:me/toy:test'}\n")
    cfg = load_config(cfg_file)
    assert (cfg.data.train_file, cfg.data.eval_file) == ("hub:me/toy", "hub:me/toy:test")


def test_hub_model_ids_resolve_in_the_local_cache(hub_cache, tmp_path, tiny_llama_dir):
    files = {f.name: f for f in tiny_llama_dir.iterdir() if f.is_file()}
    snap = fake_hub(hub_cache, "model", "me/tiny", files)
    assert resolve_model_path("me/tiny") == Path(snap)
    assert resolve_model_path("hub:me/tiny") == Path(snap)
    with pytest.raises(ModelError, match=r"model.path: me/gone: not in the local Hugging Face "
                       r"cache .*`hf download me/gone`.*model.allow_download"):  # fmt: skip
        resolve_model_path("me/gone")
    # allowed to download, a cached id is still read from the cache (no network here: a check
    # for a newer revision would fail)
    assert resolve_model_path("me/tiny", allow_download=True) == Path(snap)
    with pytest.raises(ModelError, match="a Hub model is named owner/name"):
        resolve_model_path("hub:tiny")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {path: me/tiny}\n")
    assert load_config(cfg_file).model.path == "me/tiny"
    (tmp_path / "me" / "tiny").mkdir(parents=True)  # a folder of that name here is a path
    assert load_config(cfg_file).model.path == str((tmp_path / "me" / "tiny").resolve())


def test_a_run_trains_on_a_hub_model_and_a_hub_dataset_from_the_cache(
    hub_cache, tmp_path, tiny_llama_dir
):
    from lorasft.cli import main
    from tests.conftest import QUICK, tiny_args

    fake_hub(hub_cache, "model", "me/tiny", {f.name: f for f in tiny_llama_dir.iterdir()
                                             if f.is_file()})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(demo_rows()), tmp_path / "t.parquet")
    fake_hub(hub_cache, "dataset", "me/toy", {"train.parquet": tmp_path / "t.parquet"})
    run = tmp_path / "run"
    args = tiny_args(tiny_llama_dir, run, *QUICK, "model.path=me/tiny", "data.train_file=hub:me/toy",
                     "data.eval_file=null", "train.max_steps=1")  # fmt: skip
    assert main(args) == 0
    saved = (run / "config.yaml").read_text()
    assert "path: me/tiny" in saved and "train_file: hub:me/toy" in saved
    results = json.loads((run / "results.json").read_text())
    read = results["data"]["train_files"]
    assert read["records"] == 240 and read["files"][0]["path"].endswith("/train.parquet")
    assert results["data"]["train"]["sequences"] == 216  # 24 held out (val_ratio 0.1)
    from lorasft.model.reopen import read_run

    assert main(["data", "check", "hub:me/toy", f"model.path={tiny_llama_dir}"]) == 0
    info = json.loads((run / "lorasft_run.json").read_text())
    assert read_run(run).base_path == Path(info["base_path"])  # the snapshot training used
    # the id moves on to a newer snapshot: the run still opens on the one it trained on
    entry = hub_cache / "models--me--tiny"
    newer = entry / "snapshots" / ("f" * 40)
    shutil.copytree(Path(info["base_path"]), newer)
    (entry / "refs" / "main").write_text("f" * 40)
    assert resolve_model_path("me/tiny") == newer
    assert read_run(run).base_path == Path(info["base_path"]) != newer
    assert info["base_path"].endswith(
        "models--me--tiny/snapshots/" + "0123456789abcdef" * 2 + "01234567"
    )
