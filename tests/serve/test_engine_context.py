"""`lorasft serve` rebuilds the run's context extension on the base before attaching the adapter,
as open_run does: the served model reads long inputs exactly like the trained one."""

import pytest
import torch

from lorasft.cli import main
from lorasft.model.load import ModelError
from lorasft.model.reopen import open_run
from lorasft.serve.engine import load_engine
from tests.conftest import QUICK, tiny_args


def test_served_model_has_the_runs_rope_scaling(tiny_llama_dir, tmp_path):
    run, plain = tmp_path / "yarn", tmp_path / "plain"
    ctx = ["context.target_length=512", "context.method=yarn"]
    assert main(tiny_args(tiny_llama_dir, run, *QUICK, *ctx)) == 0
    engine = load_engine(None, [("y", str(run))])
    rope = engine.model.get_base_model().config.rope_parameters
    assert rope["rope_type"] == "yarn" and engine.context_window == 512
    ref = open_run(run).model
    ids = torch.arange(5, 405).unsqueeze(0)  # longer than the 256-token original window
    with torch.no_grad():
        assert torch.allclose(engine.model(ids).logits, ref(ids).logits, atol=1e-5)
    assert main(tiny_args(tiny_llama_dir, plain, *QUICK)) == 0
    with pytest.raises(ModelError, match="different|context settings"):
        load_engine(None, [("y", str(run)), ("p", str(plain))])
