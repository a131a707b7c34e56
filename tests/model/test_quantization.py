"""QLoRA (model.quantization): a run on a 4-bit base trains, is recorded as such, reopens on the
same quantized base, merges and exports its dequantized weights, and verifies."""

import json

import pytest
import torch

from lorasft.cli import main
from lorasft.config import load_config
from lorasft.model.load import ModelError, quantization_config
from lorasft.model.plan import memory_table
from tests.conftest import PRECISIONS, QUICK, tiny_args

bnb = pytest.importorskip("bitsandbytes", reason="pip install -e '.[qlora]'")


@pytest.fixture(scope="module", params=PRECISIONS)
def qlora_run(request, tiny_llama_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp(f"qlora-{request.param}") / "run"
    args = tiny_args(tiny_llama_dir, run, "model.quantization=nf4", f"train.precision={request.param}",
                     "train.learning_rate=1e-2", "eval.num_samples=2", "eval.compare_base=false",
                     "train.eval_strategy=no", "train.early_stopping_patience=null",
                     "train.load_best_model_at_end=false")  # fmt: skip
    assert main(args) == 0
    return run


def test_the_run_records_its_quantization(qlora_run):
    assert json.loads((qlora_run / "lorasft_run.json").read_text())["quantization"] == "nf4"
    assert json.loads((qlora_run / "results.json").read_text())["train"]["quantization"] == "nf4"
    assert load_config(qlora_run / "config.yaml").model.quantization == "nf4"


def test_reopening_uses_the_same_quantized_base(qlora_run):
    """`lorasft eval` reopens the run: its response loss equals the one training measured on the
    model in memory. The control: the same adapter on the base unquantized moves the logits by
    several percent of their scale."""
    from bitsandbytes.nn import Linear4bit

    from lorasft.model.reopen import attach, open_base, open_run

    trained = json.loads((qlora_run / "results.json").read_text())["eval"]["tuned"]["perplexity"]
    assert main(["eval", str(qlora_run), "--num-samples", "0"]) == 0
    again = json.loads((qlora_run / "eval_results.json").read_text())["tuned"]["perplexity"]
    assert again["loss"] == pytest.approx(trained["loss"], abs=1e-4)
    run = open_run(qlora_run)
    assert any(isinstance(m, Linear4bit) for m in run.model.modules())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        quantized = run.model(input_ids=ids).logits.float()
        spec = run.spec
        plain_model = spec.cfg.model.model_copy(update={"quantization": "none"})
        spec.cfg = spec.cfg.model_copy(update={"model": plain_model})
        plain = attach(open_base(spec), spec)(input_ids=ids).logits.float()
    assert (quantized - plain).abs().max() > 0.02 * quantized.abs().max()


def test_merge_dequantizes_and_verify_agrees(qlora_run, tmp_path, capsys):
    merged, gguf = tmp_path / "merged", tmp_path / "model.gguf"
    assert main(["merge", str(qlora_run), "--out", str(merged)]) == 0
    assert "dequantizing it" in capsys.readouterr().err
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model folder
    assert main(["export", str(qlora_run), "--format", "gguf", "--out", str(gguf)]) == 0
    capsys.readouterr()
    assert main(["verify", str(qlora_run), "--merged", str(merged), "--gguf", str(gguf)]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out


def test_quantization_without_bitsandbytes_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))  # fmt: skip
    with pytest.raises(ModelError, match=r"lorasft\[qlora\]"):
        quantization_config("nf4", torch.float32)
    assert quantization_config("none", torch.float32) is None


def test_plan_counts_four_bit_weights(tiny_llama_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    plain = load_config(None, [f"model.path={tiny_llama_dir}"])
    nf4 = load_config(None, [f"model.path={tiny_llama_dir}", "model.quantization=nf4"])
    (a,) = memory_table(config, plain, [64], "fp32")
    (b,) = memory_table(config, nf4, [64], "fp32")
    linear = 2 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3)  # q,o + k,v + gate,up,down, 2 layers
    assert a.weights - b.weights == pytest.approx(linear * (4 - 4.127 / 8), abs=2)


def test_a_quick_qlora_run_in_int8(tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_args(tiny_llama_dir, run, "model.quantization=int8", *QUICK)) == 0
    assert json.loads((run / "lorasft_run.json").read_text())["quantization"] == "int8"
