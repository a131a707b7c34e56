"""A live server on 127.0.0.1 (a free port) with two tiny adapter runs on one tiny Llama base."""

from __future__ import annotations

import threading
import time
from typing import Self

import pytest
import uvicorn

from lorasft.cli import main
from lorasft.serve.process import free_port
from tests.conftest import QUICK, tiny_args

API_KEY = "test-key"


@pytest.fixture(scope="session")
def adapter_runs(tiny_llama_dir, tmp_path_factory):
    """Two runs that differ in seed and learning rate, trained hard enough to change greedy text."""
    root = tmp_path_factory.mktemp("serve_runs")
    a, b = root / "a", root / "b"
    assert (
        main(tiny_args(tiny_llama_dir, a, *QUICK, "train.max_steps=3", "train.learning_rate=0.05"))
        == 0
    )
    assert main(tiny_args(tiny_llama_dir, b, *QUICK, "train.max_steps=4", "train.learning_rate=0.02",
                          "train.seed=7")) == 0  # fmt: skip
    return a, b


class LiveServer:
    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def engine(adapter_runs):
    from lorasft.serve.engine import load_engine

    a, b = adapter_runs
    return load_engine(None, [("a", str(a)), ("b", str(b))])


@pytest.fixture(scope="session")
def live(engine):
    from lorasft.serve.app import create_app

    app = create_app(engine, api_key=API_KEY, max_tokens_cap=64, max_request_bytes=20_000)
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def client(live):
    from openai import OpenAI

    return OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
