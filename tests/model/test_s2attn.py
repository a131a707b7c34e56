"""S2-Attn (LongLoRA's shifted sparse attention): full attention when the group covers the
sequence, the loss of a hand-written shift-and-group reference, records never mixed (packed rows
and the flattened rows of the flash path), gradient checkpointing, and a run that trains with it
and reloads with full attention. Every numeric check in fp32 and in bf16."""

import itertools
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lorasft.cli import main
from lorasft.config import ConfigError, load_config
from lorasft.model.reopen import open_run
from lorasft.model.s2attn import (
    group_tokens,
    grouped_sdpa,
    register_s2,
    s2_attention,
    segment_starts,
)
from tests.conftest import BF16_U, PRECISIONS, QUICK, tiny_args

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
L, G = 64, 16


def tiny(dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation="sdpa")  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).train()


def loss_with(model, impl: str, x: torch.Tensor, **kw) -> torch.Tensor:
    model.set_attn_implementation(impl)
    return model(input_ids=x, labels=x, use_cache=False, **kw).loss


def tolerance(precision: str, value: float) -> float:
    """fp32: summation order only. bf16: both sides round q, k, v, the scores and each layer's
    output to bf16 (u = 2^-8 relative per rounding); over 2 layers a loss of ~log(50) moves by a
    few u; 4u of the value bounds it while a wrong group (> 3% here, see the controls) is far out."""
    return 1e-5 if precision == "fp32" else 4 * BF16_U * abs(value)


def reference(module, q, k, v, mask, *, group: int, scaling=None, dropout=0.0, **kw):
    """Written from the paper, one head and one group at a time: the first half of the heads
    attend causally inside [0, G), [G, 2G), ...; the second half inside [0, G/2), [G/2, 3G/2), ..."""
    k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
    out = torch.zeros_like(q)
    half = q.shape[1] // 2
    for h in range(q.shape[1]):
        shift = 0 if h < half else group // 2
        bounds = [0, *range(shift or group, q.shape[2], group), q.shape[2]]
        for lo, hi in itertools.pairwise(bounds):
            scores = (q[:, h, lo:hi] @ k[:, h, lo:hi].transpose(-1, -2)).float() * scaling
            causal = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
            weights = scores.masked_fill(~causal, float("-inf")).softmax(-1).to(q.dtype)
            out[:, h, lo:hi] = weights @ v[:, h, lo:hi]
    return out.transpose(1, 2), None


def register(name: str, fn, mask_like: str = "sdpa") -> str:
    ALL_ATTENTION_FUNCTIONS.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_like])
    return name


@pytest.mark.parametrize("precision", PRECISIONS)
def test_group_covering_the_sequence_is_full_attention(precision):
    model, x = tiny(DTYPES[precision]), torch.randint(0, 50, (2, L))
    full = loss_with(model, "sdpa", x)
    assert loss_with(model, register_s2("sdpa", L), x).item() == full.item()
    # The grouped code itself, one group of the whole sequence, with and without a padding mask.
    q, k, v = (torch.randn(2, 3, L, 8, dtype=DTYPES[precision]) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = grouped_sdpa(q, k, v, None, L, 0, 0.0, None)
    assert (got - want).abs().max().item() <= tolerance(precision, want.abs().max().item())
    mask = torch.ones(2, 1, L, L, dtype=torch.bool).tril()
    mask[1, :, :, 50:] = False  # row 1 right-padded after 50 tokens
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | torch.eye(L, dtype=torch.bool))
    got = grouped_sdpa(q, k, v, mask, L, 0, 0.0, None)
    assert (got - want)[:, :, :50].abs().max().item() <= tolerance(
        precision, want.abs().max().item()
    )
    # Several groups, both offsets: the mask's diagonal blocks give what no mask gives on the
    # unpadded row and on the padded row's real tokens (the blocks line up with the groups).
    for offset in (0, G // 2):
        plain = grouped_sdpa(q, k, v, None, G, offset, 0.0, None)
        masked = grouped_sdpa(q, k, v, mask, G, offset, 0.0, None)
        tol = tolerance(precision, plain.abs().max().item())
        assert (masked[0] - plain[0]).abs().max().item() <= tol
        assert (masked[1, :, :50] - plain[1, :, :50]).abs().max().item() <= tol


def logits_with(model, impl: str, x: torch.Tensor) -> torch.Tensor:
    model.set_attn_implementation(impl)
    return model(input_ids=x, use_cache=False).logits.float()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_loss_equals_the_shift_and_group_reference(precision):
    model, x = tiny(DTYPES[precision]), torch.randint(0, 50, (2, L))
    ref, s2 = register(f"s2_ref_{G}", partial(reference, group=G)), register_s2("sdpa", G)
    want = loss_with(model, ref, x).item()
    assert abs(loss_with(model, s2, x).item() - want) <= tolerance(precision, want)
    want = logits_with(model, ref, x)
    tol = tolerance(precision, want.abs().max().item())
    assert (logits_with(model, s2, x) - want).abs().max().item() <= tol
    # Controls: full attention, and groups of another size, are far from the reference (a random
    # model's loss hardly depends on the pattern, so the controls compare logits).
    for other in ("sdpa", register_s2("sdpa", 2 * G)):
        assert (logits_with(model, other, x) - want).abs().max().item() > 10 * tol
    # An odd length (last groups shorter) still matches.
    y = x[:, : L - 5]
    want = loss_with(model, ref, y).item()
    assert abs(loss_with(model, s2, y).item() - want) <= tolerance(precision, want)


def varlen_reference(module, q, k, v, mask, *, position_ids, scaling=None, is_causal=True, **kw):
    """What flash attention's variable-length kernel computes for one flattened row: causal
    attention inside each run of position ids that starts at 0."""
    assert q.shape[0] == 1 and mask is None
    k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
    seg = (position_ids[0] == 0).cumsum(0)
    j = torch.arange(q.shape[2])
    allowed = (seg[:, None] == seg[None, :]) & (j[None, :] <= j[:, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling).transpose(
        1, 2
    ), None


@pytest.mark.parametrize("precision", PRECISIONS)
def test_groups_never_cross_records(precision):
    """A packed row (two records, positions restarting) gives each record the loss it has alone,
    on the sdpa path and on the flattened-row path that flash attention takes."""
    model, x = tiny(DTYPES[precision]), torch.randint(0, 50, (2, L))
    pos = torch.cat([torch.arange(40), torch.arange(L - 40)])[None].expand(2, -1)
    s2 = register_s2("sdpa", G)
    model.set_attn_implementation(s2)
    alone = torch.cat([model(input_ids=x[:, :40]).logits, model(input_ids=x[:, 40:]).logits], 1)
    packed = model(input_ids=x, position_ids=pos, use_cache=False).logits
    tol = tolerance(precision, alone.abs().max().item())
    assert (packed - alone).abs().max().item() <= tol
    register("test_varlen", varlen_reference)
    flat = register(
        "s2_test_varlen", partial(s2_attention, inner="test_varlen", group=G), "flash_attention_2"
    )
    model.set_attn_implementation(flat)
    varlen = model(input_ids=x, position_ids=pos, use_cache=False).logits
    assert (varlen - alone).abs().max().item() <= tol
    # Control: full attention over the packed row without its position ids mixes the records.
    model.set_attn_implementation("sdpa")
    assert (model(input_ids=x, use_cache=False).logits - alone)[
        :, 40:
    ].abs().max().item() > 10 * tol


def test_segments_restart_at_records_groups_and_padding():
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    starts = segment_starts(12, 4, 0, pos, None, 1)[0].nonzero().flatten().tolist()
    assert starts == [0, 4, 6, 10]
    starts = segment_starts(12, 4, 2, pos, None, 1)[0].nonzero().flatten().tolist()
    assert starts == [0, 2, 6, 8]
    padding = torch.tensor([[1] * 9 + [0] * 3])
    starts = segment_starts(12, 4, 0, None, padding, 1)[0].nonzero().flatten().tolist()
    assert starts == [0, 4, 8, 9]
    assert group_tokens(0.25, 16384) == 4096 and group_tokens(0.25, 30) == 8
    assert group_tokens(1000, 16384) == 1000 and group_tokens(0.01, 64) == 2


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gradient_checkpointing_gives_the_same_gradients(precision):
    x = torch.randint(0, 50, (2, L))
    grads = []
    for ckpt in (False, True):
        model = tiny(DTYPES[precision])
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        loss_with(model, register_s2("sdpa", G), x).backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.float())
    scale = grads[0].abs().max().item()
    assert (grads[0] - grads[1]).abs().max().item() <= tolerance(precision, scale)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="context.s2_group=1.5"):
        load_config(None, ["context.s2_group=1.5"])
    with pytest.raises(ConfigError, match="attn_implementation=sdpa"):
        load_config(None, ["context.s2_attn=true", "model.attn_implementation=eager"])


def test_a_run_trained_with_s2_reloads_with_full_attention(tiny_llama_dir, tmp_path, capsys):
    """Trained with groups of 8 on records of up to 64 tokens (the adapter differs from a run with
    full attention: S2 was in use), reopened with the base's sdpa and full attention."""
    runs = {}
    for name, extra in (("s2", ["context.s2_attn=true", "context.s2_group=8"]), ("full", [])):
        run = tmp_path / name
        main(tiny_args(tiny_llama_dir, run, *QUICK, "data.max_length=64", "train.precision=bf16",
                       *extra))  # fmt: skip
        runs[name] = run
    assert "S2-Attn: groups of 8 tokens" in capsys.readouterr().err
    from safetensors.torch import load_file

    a, b = (load_file(runs[n] / "adapter_model.safetensors") for n in ("s2", "full"))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) > 0
    opened = open_run(runs["s2"])
    assert opened.model.get_base_model().config._attn_implementation == "sdpa"
    assert "s2_attn: true" in (runs["s2"] / "config.yaml").read_text()
    ids = opened.tok("hello world", return_tensors="pt").input_ids
    out = opened.model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
