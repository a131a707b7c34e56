"""Shifted sparse attention (S2-Attn; LongLoRA, Chen et al. 2023, arXiv 2309.12307) for training.

While a module trains, its tokens attend only inside groups of G tokens: half of the heads use the
groups [0, G), [G, 2G), ...; the other half use groups shifted by G/2, so information crosses the
boundaries of the first half's groups. Evaluation, generation and serving (module in eval mode)
use the full attention of the inner kernel, as in the paper.

It is registered through transformers' attention-function interface (`AttentionInterface` and
`AttentionMaskInterface`, the inner kernel's mask builder), not by patching model classes:

- inner `sdpa`: each group becomes a row of one batched SDPA call (the groups are computed, the
  rest of the L x L matrix never is); a 4D mask (padding, packed records) is cut into the same
  diagonal blocks, so groups never cross records.
- inner `flash_attention_*`: the whole batch becomes one flattened row whose position ids restart
  at every group, record and padding boundary, and flash attention's variable-length kernel runs
  each segment on its own.

One deliberate difference from LongLoRA's reference code: it shifts by rolling the sequence, which
puts the last G/2 tokens in one group with the first G/2, where the causal mask lets the first
tokens see the last ones (the future). Here the shifted heads' first and last groups are half
groups instead, so no token ever attends to a later one.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lorasft.console import say

INNER_KERNELS = ("sdpa", "flash_attention_2", "flash_attention_3")


def group_tokens(group: float, max_length: int) -> int:
    """Group size in tokens: `group` > 1 is tokens, <= 1 a fraction of the training length.
    Even (the shift is half a group) and at least 2."""
    tokens = group if group > 1 else group * max_length
    return max(2, round(tokens / 2) * 2)


def s2_name(inner: str, group: int) -> str:
    return f"lorasft_s2_{inner}_g{group}"


def register_s2(inner: str, group: int) -> str:
    """Register S2-Attn around `inner` with groups of `group` tokens; returns the name to pass to
    `model.set_attn_implementation`."""
    if inner not in INNER_KERNELS:
        raise ValueError(f"S2-Attn runs on {', '.join(INNER_KERNELS)}, not {inner!r}")
    name = s2_name(inner, group)
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, partial(s2_attention, inner=inner, group=group))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def s2_attention(module, query, key, value, attention_mask, *, inner: str, group: int,
                 dropout: float = 0.0, scaling: float | None = None, **kwargs):  # fmt: skip
    """An attention function with transformers' signature: query [b, heads, L, d], key/value
    [b, kv_heads, L, d]; returns ([b, L, heads, d], None)."""
    full = ALL_ATTENTION_FUNCTIONS[inner]
    length = query.shape[2]
    if not module.training or length <= group or key.shape[2] != length:
        return full(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                    **kwargs)  # fmt: skip
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    half = query.shape[1] // 2
    outs = []
    for heads, offset in ((slice(0, half), 0), (slice(half, None), group // 2)):
        q, k, v = query[:, heads], key[:, heads], value[:, heads]
        if q.shape[1] == 0:
            continue
        if inner == "sdpa" and is_packed(kwargs.get("position_ids")):
            outs.append(masked_sdpa(q, k, v, attention_mask, group, offset, dropout, scaling,
                                    kwargs["position_ids"]))  # fmt: skip
        elif inner == "sdpa":
            outs.append(grouped_sdpa(q, k, v, attention_mask, group, offset, dropout, scaling))
        else:
            outs.append(grouped_varlen(full, module, q, k, v, attention_mask, group, offset,
                                       dropout, scaling, kwargs, inner))  # fmt: skip
    return torch.cat(outs, dim=1).transpose(1, 2).contiguous(), None


# --- inner sdpa: groups as batch rows -------------------------------------------------------


def grouped_sdpa(q, k, v, mask, group: int, offset: int, dropout: float, scale):
    """Causal attention inside [0, offset) and inside each group of `group` tokens after it."""
    length = q.shape[2]
    mask = _bool_mask(mask)
    parts = []
    if offset:
        head = None if mask is None else _with_diagonal(mask[..., :offset, :offset])
        parts.append(
            _sdpa(q[:, :, :offset], k[:, :, :offset], v[:, :, :offset], head, dropout, scale)
        )
    rest = length - offset
    n = -(-rest // group)
    pad = n * group - rest
    qs, ks, vs = (_as_groups(t[:, :, offset:], n, group, pad) for t in (q, k, v))
    masks = None if mask is None else _mask_groups(mask[..., offset:, offset:], n, group, pad)
    out = _sdpa(qs, ks, vs, masks, dropout, scale)
    b, h, _, d = q.shape
    parts.append(
        out.view(b, n, h, group, d).transpose(1, 2).reshape(b, h, n * group, d)[:, :, :rest]
    )
    return torch.cat(parts, dim=2)


def masked_sdpa(q, k, v, mask, group: int, offset: int, dropout: float, scale, position_ids):
    """Packed rows (position ids restarting per record): the groups follow each record, so they
    do not line up with fixed blocks of the row; the whole row is computed under a mask of the
    segments (as costly as full attention: on CPU, packing has no variable-length kernel anyway)."""
    b, _, length, _ = q.shape
    seg = segment_starts(length, group, offset, position_ids, None, b).cumsum(-1)
    j = torch.arange(length, device=q.device)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (j[None, None, :] <= j[None, :, None])
    allowed = allowed[:, None]
    mask = _bool_mask(mask)
    if mask is not None:
        allowed = allowed & mask
    return _sdpa(q, k, v, _with_diagonal(allowed), dropout, scale)


def _sdpa(q, k, v, mask, dropout: float, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                          is_causal=mask is None)  # fmt: skip


def _as_groups(t: torch.Tensor, n: int, group: int, pad: int) -> torch.Tensor:
    """[b, h, n*G - pad, d] -> [b*n, h, G, d], zero-padded at the end (a causal query never sees
    the padding after it; padded queries are dropped)."""
    b, h, _, d = t.shape
    t = F.pad(t, (0, 0, 0, pad))
    return t.view(b, h, n, group, d).transpose(1, 2).reshape(b * n, h, group, d)


def _mask_groups(mask: torch.Tensor, n: int, group: int, pad: int) -> torch.Tensor:
    """The diagonal G x G blocks of a [b, 1, L, L] boolean mask, as [b*n, 1, G, G]."""
    b = mask.shape[0]
    m = F.pad(mask[:, 0], (0, pad, 0, pad), value=False).view(b, n, group, n, group)
    m = m.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(b * n, 1, group, group)
    return _with_diagonal(m)


def _with_diagonal(mask: torch.Tensor) -> torch.Tensor:
    """Let every query see itself: a padded query with no visible key would give NaN (its output
    is dropped, but NaN * 0 is still NaN in the backward pass). Real queries see themselves anyway."""
    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    return mask | eye


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # an additive float mask: 0 = attend


# --- inner flash attention: one flattened row, segments by position ids ------------------------


def segment_starts(length: int, group: int, offset: int, position_ids: torch.Tensor | None,
                   padding: torch.Tensor | None, batch: int) -> torch.Tensor:  # fmt: skip
    """[batch, L] True where a segment starts: each record (position 0; a packed row has several),
    each group boundary counted from the record's start (offset, offset + G, ...) and the first
    padding token (padding: [batch, L], 1 = real token). Groups follow each record, so a packed
    record is split exactly as it would be alone in its row."""
    device = position_ids.device if position_ids is not None else None
    pos = torch.arange(length, device=device) if position_ids is None else position_ids
    pos = pos.expand(batch, length)
    start = (pos == 0) | (((pos - offset) % group == 0) & (pos >= offset))
    start[:, 0] = True
    if padding is not None:
        pad = padding.to(torch.bool).logical_not()
        start[:, 1:] |= pad[:, 1:] & ~pad[:, :-1]
    return start


def segment_positions(start: torch.Tensor) -> torch.Tensor:
    """Each token's index inside its segment."""
    j = torch.arange(start.shape[-1], device=start.device)
    return j - torch.where(start, j, torch.zeros_like(j)).cummax(dim=-1).values


def is_packed(position_ids: torch.Tensor | None) -> bool:
    if position_ids is None:
        return False
    return bool(
        (position_ids != torch.arange(position_ids.shape[-1], device=position_ids.device)).any()
    )


def grouped_varlen(full, module, q, k, v, mask, group: int, offset: int, dropout: float, scale,
                   kwargs: dict, inner: str):  # fmt: skip
    """The batch as one flattened row [1, h, b*L, d] whose positions restart at every segment,
    through the variable-length kernel; back to [b, h, L, d]."""
    b, h, length, d = q.shape
    padding = mask if mask is not None and mask.dim() == 2 else None
    pos = segment_positions(
        segment_starts(length, group, offset, kwargs.get("position_ids"), padding, b)
    )
    rest = {k_: v_ for k_, v_ in kwargs.items() if k_ not in ("position_ids", "is_causal")
            and not k_.startswith(("cu_seq_lens", "max_length"))}  # fmt: skip

    def flat(t):
        return t.transpose(0, 1).reshape(1, h, b * length, d)

    pos = pos.reshape(1, -1)
    if inner.startswith("flash_attention"):
        out = _flash_varlen(module, flat(q), flat(k), flat(v), pos, inner, dropout, scale, rest)
    else:  # any other registered variable-length function (the tests' CPU reference)
        out, _ = full(module, flat(q), flat(k), flat(v), None, dropout=dropout, scaling=scale,
                      is_causal=True, position_ids=pos, **rest)  # fmt: skip
    return out.view(b, length, h, d).transpose(1, 2)


def _flash_varlen(module, q, k, v, pos, inner: str, dropout: float, scale, rest: dict):
    """transformers' flash attention call, with the kernel named explicitly: its public wrapper
    looks the kernel up by the model's attention name, which is S2's while it trains."""
    from transformers.integrations.flash_attention import _use_top_left_mask, get_target_dtype
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [1, tokens, heads, d]
    return _flash_attention_forward(
        q, k, v, None, query_length=q.shape[1], is_causal=True, dropout=dropout,
        position_ids=pos, softmax_scale=scale, use_top_left_mask=_use_top_left_mask,
        target_dtype=get_target_dtype(q, module), attn_implementation=inner,
        layer_idx=getattr(module, "layer_idx", None), **rest,
    )  # fmt: skip


@contextmanager
def s2_training(model, ctx, max_length: int):
    """Inside: the (LoRA-wrapped) model attends with S2-Attn while it trains, when the context
    section asks for it; afterwards the inner kernel again."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.config._attn_implementation
    if not ctx.s2_attn:
        yield
        return
    group = group_tokens(ctx.s2_group, max_length)
    base.set_attn_implementation(register_s2(inner, group))
    say(f"S2-Attn: groups of {group} tokens (half the heads shifted by {group // 2}) "
        f"around {inner} while training; full attention in evaluation")  # fmt: skip
    try:
        yield
    finally:
        base.set_attn_implementation(inner)
