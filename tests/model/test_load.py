import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasft.cli import main
from lorasft.config import ConfigError
from lorasft.model.load import ModelError, load_model, resolve_model_path, set_global_dropout
from lorasft.model.precision import resolve_precision
from lorasft.train.setup import check_optimizer


def _logits(path):
    m = load_model(resolve_model_path(str(path)))
    with torch.no_grad():
        return m(torch.tensor([[5, 6, 7]])).logits


def test_sharded_safetensors_and_bin_load_the_same_weights(tiny_llama_dir, tmp_path):
    ref = _logits(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (
        len(list(sharded.glob("*.safetensors"))) > 1
        and (sharded / "model.safetensors.index.json").exists()
    )
    assert torch.allclose(_logits(sharded), ref)
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    assert torch.allclose(_logits(binary), ref)  # through weights_only loading


def test_missing_shard_is_named(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    victim = min(sharded.glob("*.safetensors"))
    victim.unlink()
    with pytest.raises(ModelError, match=f"names shards that are missing: {victim.name}"):
        resolve_model_path(str(sharded))


def test_global_dropout_sets_the_fields_the_architecture_has(tiny_llama_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    assert set_global_dropout(cfg, 0.1) == ["attention_dropout"] and cfg.attention_dropout == 0.1
    m = load_model(tiny_llama_dir, global_dropout=0.2)
    assert m.config.attention_dropout == 0.2


def test_8bit_optimizer_on_cpu_is_a_clear_error(capsys, tiny_llama_dir):
    with pytest.raises(
        ConfigError, match="adamw_8bit needs a CUDA GPU and the bitsandbytes package"
    ):
        check_optimizer("adamw_8bit")
    assert main(["train", f"model.path={tiny_llama_dir}", "train.optimizer=adamw_8bit"]) == 2
    assert "use train.optimizer=adamw" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule")
def test_precision_on_this_cpu(capsys):
    """auto: bf16 where the CPU has it natively, else fp32; an explicit bf16 is honoured, with a
    message where it is emulated."""
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto") == ("bf16" if native else "fp32")
    capsys.readouterr()
    assert resolve_precision("bf16") == "bf16"
    assert ("bf16 is emulated" in capsys.readouterr().err) == (not native)
    assert resolve_precision("fp32") == "fp32" and resolve_precision("fp16") == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without GPU")
def test_flash_attention_without_gpu_is_a_clear_error(tiny_llama_dir):
    with pytest.raises(ModelError, match="flash_attention_2 needs a CUDA GPU.*no CUDA GPU.*sdpa"):
        load_model(tiny_llama_dir, attn_implementation="flash_attention_2")


def test_flash_attention_needs_gpu_package_and_16_bits():
    from lorasft.model.load import attention_problem

    bf16, fp32 = torch.bfloat16, torch.float32
    assert attention_problem("sdpa", fp32, cuda=False, package=False) is None
    assert attention_problem("flash_attention_2", bf16, cuda=True, package=True) is None
    assert "a GPU but not the package" in attention_problem("flash_attention_2", bf16, True, False)
    assert "no CUDA GPU" in attention_problem("flash_attention_3", bf16, False, False)
    assert "train.precision=bf16" in attention_problem("flash_attention_2", fp32, True, True)
