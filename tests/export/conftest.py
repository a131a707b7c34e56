"""One finished tiny-Llama run shared by the export tests (training it takes a few seconds)."""

from __future__ import annotations

import pytest

from lorasft.cli import main
from tests.conftest import PRECISIONS, tiny_args


@pytest.fixture(scope="session", params=PRECISIONS)
def tiny_run(request, tmp_path_factory, tiny_llama_dir):
    """Trained in fp32 and in bf16: every export test runs on both."""
    run = tmp_path_factory.mktemp(f"export-{request.param}") / "run"
    # A high learning rate so the adapter moves the logits visibly: a merge that dropped it
    # would fail the comparisons below.
    targets = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
    args = tiny_args(tiny_llama_dir, run, "train.learning_rate=2e-2", targets,
                     "eval.num_samples=0", "eval.compare_base=false",
                     f"train.precision={request.param}")  # fmt: skip
    assert main(args) == 0
    return run
