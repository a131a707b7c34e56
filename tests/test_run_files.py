"""The run folder's one atomic write: a reader polling the file sees the old content or the new,
never half (the dashboard reads results.json and progress.json while runs write them)."""

from __future__ import annotations

import json
import threading

import pytest

from lorasft.run_files import read_json, replaced, write_json


def _poll_while_writing(path, write) -> tuple[int, int]:
    """(reads that parsed, reads that did not) while `write` rewrites `path` 100 times."""
    versions = [{"version": i, "pad": "x" * 400_000} for i in range(100)]
    write(path, versions[0])
    done, good, bad = threading.Event(), 0, 0

    def writer():
        for v in versions[1:]:
            write(path, v)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    while not done.is_set():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            assert data["pad"] == versions[0]["pad"]
            good += 1
        except (json.JSONDecodeError, FileNotFoundError):
            bad += 1
    t.join()
    return good, bad


def test_a_polling_reader_never_sees_half_a_file(tmp_path):
    good, bad = _poll_while_writing(tmp_path / "results.json", write_json)
    assert good > 0 and bad == 0
    assert read_json(tmp_path / "results.json")["version"] == 99
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left


def test_the_control_a_plain_write_is_seen_half_written(tmp_path):
    """What the atomic write prevents: writing in place, a poller reads truncated JSON."""

    def plain(path, data):
        path.write_text(json.dumps(data), encoding="utf-8")

    bad = sum(_poll_while_writing(tmp_path / "r.json", plain)[1] for _ in range(3))
    assert bad > 0


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "progress.json"
    write_json(path, {"step": 1})
    with pytest.raises(RuntimeError), replaced(path) as tmp:
        tmp.write_text('{"step": ')
        raise RuntimeError("disk full")
    assert read_json(path) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == [path.name]
    path.write_text('{"step": 2')  # damaged (a writer from before, a copy in progress)
    assert read_json(path) is None and read_json(tmp_path / "missing.json") is None
