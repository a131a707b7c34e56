"""`lorasft serve --engine vllm` (GPU; not run on this project's CPU machines): the command line
lorasft starts vLLM with, and the refusal where vLLM is missing."""

from itertools import pairwise
from pathlib import Path

import pytest

from lorasft.model.load import ModelError
from lorasft.serve.vllm import VllmServer, load_vllm_engine


def test_vllm_gets_the_adapters_as_lora_modules_and_its_key_in_the_environment():
    server = VllmServer(Path("/opt/vllm"), base=Path("/m/base"), base_name="default",
                        loras={"a": Path("/runs/a"), "b": Path("/runs/b")}, slots=4, window=8192,
                        dtype="bfloat16", max_rank=16)  # fmt: skip
    cmd = server.command()
    assert cmd[:3] == ["/opt/vllm", "serve", "/m/base"]
    flags = dict(pairwise(cmd))  # each flag with the word after it
    assert flags["--host"] == "127.0.0.1" and flags["--served-model-name"] == "default"
    assert flags["--max-model-len"] == "8192" and flags["--max-num-seqs"] == "4"
    assert flags["--max-lora-rank"] == "16" and flags["--max-loras"] == "2"
    assert cmd[cmd.index("--lora-modules") + 1 :][:2] == ["a=/runs/a", "b=/runs/b"]
    assert server.key not in " ".join(cmd) and server.env() == {"VLLM_API_KEY": server.key}


def test_without_vllm_the_engine_is_refused_by_name(monkeypatch):
    monkeypatch.setattr("lorasft.serve.vllm.find_vllm", lambda: None)
    with pytest.raises(ModelError, match="pip install vllm"):
        load_vllm_engine(None, [])
