"""A model folder's config is read once per process, each caller getting its own copy."""

from __future__ import annotations

import json

from lorasft.model import load
from lorasft.model.context import base_window


def test_one_read_per_folder_and_a_copy_each(tiny_llama_dir, monkeypatch, tmp_path):
    calls, real = [], load.AutoConfig.from_pretrained
    monkeypatch.setattr(load.AutoConfig, "from_pretrained",
                        lambda path, **kw: calls.append(path) or real(path, **kw))  # fmt: skip
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    first = load.read_config(folder)
    first.max_position_embeddings = 99  # a caller extends its copy
    assert base_window(folder) == 256 and load.read_config(folder).max_position_embeddings == 256
    assert calls == [str(folder)]
    cfg = json.loads((folder / "config.json").read_text())  # the file changes: read again
    (folder / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 1024}))
    assert load.read_config(folder).max_position_embeddings == 1024 and len(calls) == 2
