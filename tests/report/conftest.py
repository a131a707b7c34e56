"""A finished tiny run with evaluations, samples and base-vs-tuned metrics, for the reports."""

from __future__ import annotations

import pytest

from lorasft.cli import main
from tests.conftest import tiny_args


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def finished_run(tiny_llama_dir, runs_root):
    run = runs_root / "tiny-a"
    args = tiny_args(tiny_llama_dir, run, "train.max_steps=6", "train.eval_steps=2",
                     "eval.num_samples=4", "eval.max_new_tokens=8")  # fmt: skip
    assert main(args) == 0
    return run


@pytest.fixture(scope="session")
def second_run(tiny_llama_dir, runs_root):
    run = runs_root / "tiny-b"
    args = tiny_args(tiny_llama_dir, run, "train.max_steps=6", "train.eval_steps=3",
                     "train.learning_rate=5e-3", "eval.num_samples=4", "eval.max_new_tokens=8")  # fmt: skip
    assert main(args) == 0
    return run


@pytest.fixture
def ui(runs_root, finished_run):
    """`lorasft ui` on the runs folder (key "k"), chat on the transformers engine."""
    from lorasft.serve.engine_choice import EngineOptions
    from lorasft.serve.ui import create_ui
    from tests.serve.conftest import LiveServer

    app = create_ui(runs_root, EngineOptions(engine="transformers"), api_key="k")
    with LiveServer(app) as server:
        yield server
