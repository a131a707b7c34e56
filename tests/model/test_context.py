"""Context extension on the bare model: RoPE parameters and rotary rebuild, learned position
tables, the modules saved with the adapter, and the round trip through `PeftModel.from_pretrained`."""

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorasft.config import ConfigError, ContextSection, LoraSection
from lorasft.model.context import apply_context, context_modules_to_save, extend_table
from lorasft.model.lora import apply_lora
from tests.conftest import build_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer_dir):
    return {
        k: build_model(k, tmp_path_factory.mktemp(k), tiny_tokenizer_dir)
        for k in ("llama", "gpt2", "opt")
    }


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def ctx(**kw) -> ContextSection:
    return ContextSection(target_length=1024, **kw)  # tiny models have a window of 256


@pytest.mark.parametrize("method", ["linear", "dynamic", "yarn", "llama3"])
def test_rope_parameters_set_and_rotary_rebuilt(model_dirs, method):
    model = load(model_dirs["llama"])
    rotary = model.model.rotary_emb
    theta = model.config.rope_parameters["rope_theta"]
    plan = apply_context(model, ctx(method=method))
    assert plan.factor == 4.0 and plan.original == 256
    rope = model.config.rope_parameters
    assert rope["rope_type"] == method and rope["factor"] == 4.0 and rope["rope_theta"] == theta
    assert model.model.rotary_emb is not rotary
    new = model.model.rotary_emb
    if method in ("yarn", "llama3"):
        assert rope["original_max_position_embeddings"] == 256
    if method == "dynamic":
        # Dynamic NTK keeps the trained window and changes the base only past it.
        assert model.config.max_position_embeddings == 256
        assert torch.equal(new.inv_freq, rotary.inv_freq)
        x, pos = torch.zeros(1, 1, 8), torch.arange(1024)[None]
        new(x, pos)
        assert (new.inv_freq < rotary.inv_freq).sum() >= 1 and new.inv_freq[0] == rotary.inv_freq[0]
        return
    assert model.config.max_position_embeddings == 1024
    if method == "linear":
        assert torch.allclose(new.inv_freq, rotary.inv_freq / 4)
    else:
        assert not torch.equal(new.inv_freq, rotary.inv_freq)
        assert new.inv_freq[0] == rotary.inv_freq[0]  # the highest frequency is left alone
    if method == "yarn":
        assert new.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)


def test_none_raises_only_the_limit(model_dirs):
    model = load(model_dirs["llama"])
    before = model.model.rotary_emb.inv_freq.clone()
    plan = apply_context(model, ctx(method="none"))
    assert plan.factor is None and model.config.max_position_embeddings == 1024
    assert model.config.rope_parameters.get("rope_type", "default") == "default"
    assert torch.equal(model.model.rotary_emb.inv_freq, before)


def test_explicit_factor_is_kept(model_dirs):
    model = load(model_dirs["llama"])
    apply_context(model, ctx(method="yarn", factor=8.0))
    assert model.config.rope_parameters["factor"] == 8.0


@pytest.mark.parametrize(
    "kind,method,match",
    [
        ("gpt2", "yarn", "learned absolute position table"),
        ("llama", "interpolate", "uses RoPE"),
        ("gpt2", "none", "learned absolute"),
    ],
)
def test_method_must_fit_the_architecture(model_dirs, kind, method, match):
    with pytest.raises(ConfigError, match=f"context.method='{method}'.*{match}"):
        apply_context(load(model_dirs[kind]), ctx(method=method))


def test_target_must_exceed_the_window(model_dirs):
    with pytest.raises(ConfigError, match="context.target_length=128.*already 256"):
        apply_context(load(model_dirs["llama"]), ContextSection(target_length=128))


def test_extend_table_values_exact():
    w = torch.tensor(
        [[9.0, 9.0], [0.0, 0.0], [2.0, 4.0], [4.0, 8.0]]
    )  # one reserved row, 3 positions
    interp = extend_table(w, 5, "interpolate", offset=1)
    assert torch.equal(interp, torch.tensor([[9.0, 9.0], [0, 0], [1, 2], [2, 4], [3, 6], [4, 8]]))
    copy = extend_table(w, 7, "copy", offset=1)
    assert torch.equal(copy[1:], w[1:][torch.tensor([0, 1, 2, 0, 1, 2, 0])]) and copy[0, 0] == 9
    rand = extend_table(w, 6, "random", offset=1)
    assert rand.shape == (7, 2) and torch.equal(rand[:4], w)
    assert rand[4:].abs().max() < 1.0 and rand[4:].abs().sum() > 0


@pytest.mark.parametrize(
    "kind,path,offset",
    [("gpt2", "transformer.wpe", 0), ("opt", "model.decoder.embed_positions", 2)],
)
@pytest.mark.parametrize("method", ["interpolate", "copy", "random"])
def test_position_table_extended(model_dirs, kind, path, offset, method):
    model = load(model_dirs[kind])
    old = model.get_submodule(path).weight.detach().clone()
    apply_context(model, ctx(method=method))
    table = model.get_submodule(path)
    assert (
        table.weight.shape == (1024 + offset, old.shape[1])
        and table.num_embeddings == 1024 + offset
    )
    assert model.config.max_position_embeddings == 1024
    assert torch.equal(table.weight[:offset], old[:offset])
    if method == "interpolate":  # the first and last trained rows are the ends of the new table
        assert torch.equal(table.weight[offset], old[offset]) and torch.allclose(
            table.weight[-1], old[-1]
        )
    else:
        assert torch.equal(table.weight[: old.shape[0]], old)
    ids = torch.randint(3, 100, (1, 600))
    assert model(input_ids=ids).logits.shape == (1, 600, model.config.vocab_size)


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("llama", {"embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}),
        ("gpt2", {"wpe", "wte", "ln_1", "ln_2", "ln_f"}),
        ("opt", {"embed_positions", "embed_tokens", "self_attn_layer_norm", "final_layer_norm"}),
    ],
)
def test_trainable_maps_to_module_names(model_dirs, kind, expected):
    model = load(model_dirs[kind])
    assert set(context_modules_to_save(model, ctx(trainable=["embed", "norm"]))) == expected


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_extended_model_round_trips_through_peft(model_dirs, kind, tmp_path):
    section = ctx(trainable=["norm"], method="linear")
    model = load(model_dirs[kind])
    apply_context(model, section)
    lora = LoraSection(
        target_modules="all-linear", modules_to_save=context_modules_to_save(model, section)
    )
    peft = apply_lora(model, lora)
    with torch.no_grad():  # stand-in for training: touch every saved module
        for name, p in peft.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    peft.save_pretrained(tmp_path)
    base = load(model_dirs[kind])
    apply_context(base, section)
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    ids = torch.randint(3, 100, (1, 700))
    with torch.no_grad():
        assert torch.allclose(
            peft.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5
        )


def test_context_window_is_the_runs_or_a_clear_error():
    from types import SimpleNamespace

    from lorasft.config import ConfigError
    from lorasft.model.context import context_window

    dynamic = SimpleNamespace(max_position_embeddings=256,
                              rope_parameters={"rope_type": "dynamic", "factor": 2.0})  # fmt: skip
    assert context_window(dynamic) == 512  # dynamic keeps the field at the trained window
    assert context_window(SimpleNamespace(n_positions=1024)) == 1024  # GPT-2 style
    with pytest.raises(ConfigError, match=r"/x/model: config.json has none of .* add max_pos"):
        context_window(SimpleNamespace(model_type="llama", _name_or_path="/x/model"))
