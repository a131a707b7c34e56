"""`lora.target_modules: attention` puts LoRA on exactly the linear layers of the attention blocks,
on Llama-like models (by name) and on GPT-2 (whose c_proj is in attn and in mlp: by pattern)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lorasft.config import ConfigError, LoraSection, load_config
from lorasft.model.lora import apply_lora, peft_targets
from lorasft.model.plan import count_parameters


def _lora_layers(model) -> set[str]:
    """Names of the layers that got LoRA, without PEFT's prefix."""
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if hasattr(m, "lora_A")}  # fmt: skip


def _llama() -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)  # fmt: skip


def _gpt2() -> GPT2Config:
    return GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_on_llama_is_q_k_v_o_by_name(dtype):
    model = AutoModelForCausalLM.from_config(_llama(), dtype=dtype)
    assert peft_targets(model, "attention") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    lora = apply_lora(model, LoraSection(target_modules="attention", r=2))
    assert _lora_layers(lora) == {f"model.layers.{i}.self_attn.{p}_proj"
                                  for i in range(2) for p in "qkvo"}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_on_gpt2_leaves_the_mlp_alone(dtype):
    model = AutoModelForCausalLM.from_config(_gpt2(), dtype=dtype)
    assert isinstance(peft_targets(model, "attention"), str)  # c_proj is in mlp too
    lora = apply_lora(model, LoraSection(target_modules="attention", r=2))
    assert _lora_layers(lora) == {f"transformer.h.{i}.attn.{p}"
                                  for i in range(2) for p in ("c_attn", "c_proj")}  # fmt: skip


@pytest.mark.parametrize("config", [_llama, _gpt2])
def test_plan_counts_the_attention_layers_lora_gets(config):
    """`lorasft plan`'s trainable count agrees with the model PEFT builds."""
    cfg = load_config(None, ["lora.target_modules=attention", "lora.r=2"])
    lora = apply_lora(AutoModelForCausalLM.from_config(config()), cfg.lora)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert count_parameters(config(), cfg)[1] == trainable > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_matches_listed_names_as_peft_does(dtype):
    """A listed name is a module's whole last part, as PEFT matches it: "proj" is not q_proj
    (the plan once counted every name ending in the string)."""
    cfg = load_config(None, ["lora.target_modules=[o_proj,proj]", "lora.r=2"])
    lora = apply_lora(AutoModelForCausalLM.from_config(_llama(), dtype=dtype), cfg.lora)
    assert _lora_layers(lora) == {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert count_parameters(_llama(), cfg)[1] == trainable == 2 * 2 * (16 + 16)


def test_attention_without_attention_blocks_is_a_clear_error():
    from torch import nn

    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(4, 4)

    with pytest.raises(
        ConfigError, match="target_modules=attention: .*Module names in this model include: mixer"
    ):
        peft_targets(NoAttention(), "attention")
    assert peft_targets(NoAttention(), ["mixer"]) == ["mixer"]


def test_the_error_of_attention_is_not_wrapped_twice():
    from torch import nn

    with pytest.raises(ConfigError) as e:
        apply_lora(nn.Sequential(nn.Linear(4, 4)), LoraSection())
    assert str(e.value).count("lora.target_modules") == 1


def test_attention_names_no_layer_outside_attention():
    """A name an attention layer shares with any other module (here a conv, which PEFT would also
    wrap by name) or an attention block at the top level: the pattern, on exactly those layers."""
    from torch import nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleDict({"proj": nn.Linear(4, 4)})  # a block at the top level
            self.patch = nn.ModuleDict({"proj": nn.Conv2d(1, 1, 1)})

    from peft import LoraConfig, inject_adapter_in_model

    model = Model()
    targets = peft_targets(model, "attention")
    assert isinstance(targets, str)
    assert _lora_layers(
        inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), model)
    ) == {"attn.proj"}
