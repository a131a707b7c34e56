"""Batched generation from conversations through the shared prompt builder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from threading import Thread

import torch
from transformers import (
    AttentionInterface,
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lorasft.data.tokenize import prompt_ids
from lorasft.model.generation import GenSettings
from lorasft.model.reopen import frozen_dtype

# In a batch whose decoding does not compute as alone (`_decodes_as_alone`):
# a greedy step whose best and second-best logits are closer than this may go either way when the
# same row is computed in a batch instead of alone: a batch's matmuls run other kernels than one
# row's, so every layer rounds differently. (Padding no longer does: `_rowwise_sdpa`.) Measured in
# units of the base's dtype eps times the best logit's size (at least 1); in bf16 one unit is one
# to two steps of the grid the logits lie on. On the demo run (bench/speed/eval_speed.py, 2026-12-02),
# exact batching's path without this check parted from one-at-a-time answers on 7 of 64 rows,
# the same 7 in batches of 8 and of 32, at closest calls of 0 (5 rows), 0.70 and 1.95 units:
# the bound is twice the largest. (With plain SDPA in batches of 32 one row had parted at 2.39;
# on an Intel Xeon with AMX, prompts read together, 16 of 64 rows at 0-1.08 units.)
# fp32 answers never parted; its floor, a relative gap of 1e-5 (84 fp32 units), is kept for the
# rounding fp32 piles up over the layers. An empirical bound, not a proof.
NEAR_TIE_EPS = 4.0
NEAR_TIE_FLOOR = 1e-5


def near_tie_limit(dtype: torch.dtype) -> float:
    """The near-tie bound in `_Margins` units for a base held in `dtype`."""
    eps = torch.finfo(dtype).eps
    return max(NEAR_TIE_EPS, NEAR_TIE_FLOOR / eps)


ROWWISE = "lorasft_rowwise_sdpa"
"""The attention `generate` runs exact greedy batches with (`_rowwise_sdpa`), registered through
transformers' AttentionInterface under this name."""


def _rowwise_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention called once per row, on that row's own keys (its left
    padding cut off) and without a mask: the call SDPA gets for that prompt alone. SDPA's sums
    run over every key given, padding included, so a padded row rounded differently from the
    same row unpadded (bf16 answers of a batch of 32 prompts of 56-98 tokens parted from alone
    ones past the near-tie bound), and in fp32 a row's result also depended on the rows called
    with it. Row by row, a row's scores equal its own in any batch of as many rows
    (tests/eval/test_generate.py). Anything but left padding before a row's keys, or several
    queries after earlier keys, gets the plain call."""
    rows, queries, keys = query.shape[0], query.shape[2], key.shape[2]
    spans = _own_keys(attention_mask, rows, keys)
    if spans is None or 1 < queries != keys:  # a window, a static cache; chunked prefill
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = query.new_zeros(rows, queries, query.shape[1], value.shape[-1])
    for b, (pad, n) in enumerate(spans):
        if n == 0:  # a row of padding only: nothing to attend to
            continue
        first = queries - min(queries, n)  # the row's first real query
        row, _ = sdpa_attention_forward(module, query[b : b + 1, :, first:],
                                        key[b : b + 1, :, pad:], value[b : b + 1, :, pad:],
                                        None, **kwargs)  # fmt: skip
        out[b, first:] = row[0]
    return out, None


def _own_keys(attention_mask, rows: int, keys: int) -> list[tuple[int, int]] | None:
    """Per row, (padding, real keys) when the keys its last query sees are all the keys after
    its left padding; None otherwise (a static cache's empty slots, a window)."""
    if attention_mask is None:
        return [(0, keys)] * rows
    last = attention_mask[:, 0, -1, :]
    seen = last if last.dtype == torch.bool else last == 0  # a boolean or an additive mask
    if not bool((seen[:, 1:] >= seen[:, :-1]).all()):  # a hidden key after a seen one
        return None
    return [(keys - n, n) for n in seen.sum(dim=-1).tolist()]


AttentionInterface.register(ROWWISE, _rowwise_sdpa)
AttentionMaskInterface.register(ROWWISE, sdpa_mask)


def _full_causal_sdpa(model) -> bool:
    """SDPA over every earlier token in every layer of a text-only model that takes its
    attention from transformers' AttentionInterface: what `_rowwise_sdpa` reproduces (a sliding
    window also hides a row's first keys; a composite model's other parts keep theirs)."""
    cfg = model.config
    if cfg.get_text_config() is not cfg or cfg._attn_implementation != "sdpa":
        return False
    can_switch = getattr(model, "_can_set_attn_implementation", None)  # Falcon, remote code: no
    layers = getattr(cfg, "layer_types", None) or ["full_attention"]
    return (callable(can_switch) and can_switch() and getattr(cfg, "sliding_window", None) is None
            and set(layers) == {"full_attention"})  # fmt: skip


@contextmanager
def _padding_free_attention(model, gen: GenSettings):
    """Exact greedy batches run `_rowwise_sdpa` where the model runs plain SDPA; as it was after.
    Yields whether it does. It sets the model's attention for the time being: no other thread
    may use the model then."""
    if gen.do_sample or not gen.exact or not _full_causal_sdpa(model):
        yield False
        return
    model.set_attn_implementation(ROWWISE)
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")


@torch.no_grad()
def generate(model, tok, conversations: list[list[dict]], gen: GenSettings, base: bool = False,
             stats: dict | None = None) -> list[str]:  # fmt: skip
    """Responses in input order; `base=True` runs with the LoRA adapter disabled.

    Greedy answers equal those generated one at a time: prompts are batched (left padding, by
    length); on SDPA models whose linear layers round a batch's rows as alone
    (`_linears_round_rows_alike`) each prompt is read alone and only the decoding is batched,
    each row's attention skipping its padding (`_from_alone_prefills`). A batch whose first decoding
    step computed every row as alone, bit for bit, is kept as it is; in any other batch a row
    whose path passed a near tie (`NEAR_TIE_EPS`) is generated again alone (unless `gen.exact`
    is false).
    `stats`, when given, adds up `redone_alone` (how many), `batches` and `batches_as_alone`
    (batches of several rows, and those whose decoding computed as alone), and extends `margins`
    (per conversation, its batched path's closest call in `_Margins` units; None where not
    watched)."""
    model.eval()
    prompts = [prompt_ids(m, tok) for m in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    closest: list[float | None] = [None] * len(prompts)
    counts = {"redone_alone": 0, "batches": 0, "batches_as_alone": 0}
    limit = near_tie_limit(frozen_dtype(model))
    ctx = model.disable_adapter() if base else nullcontext()
    alike: dict[int, bool] = {}  # batch size -> whether the linear layers round its rows as alone
    with ctx, _padding_free_attention(model, gen) as rowwise:
        for s in range(0, len(order), gen.batch_size):
            idx = order[s : s + gen.batch_size]
            batch = [prompts[i] for i in idx]
            if rowwise and len(batch) > 1 and len(batch) not in alike:
                alike[len(batch)] = _linears_round_rows_alike(model, len(batch))
            if rowwise and len(batch) > 1 and alike[len(batch)]:
                answers, as_alone = _from_alone_prefills(model, tok, batch, gen)
            else:
                answers, as_alone = _generate_batch(model, tok, batch, gen), len(batch) == 1
            counts["batches"] += len(batch) > 1
            counts["batches_as_alone"] += len(batch) > 1 and as_alone
            for i, answer in zip(idx, answers):
                last = None if as_alone else answer.last_near_tie(limit)
                if last is not None and gen.exact:
                    answer.text = _alone(model, tok, prompts[i], gen, answer, last)
                    counts["redone_alone"] += 1
                out[i], closest[i] = answer.text, min(answer.margins, default=None)
    if stats is not None:
        for k, n in counts.items():
            stats[k] = stats.get(k, 0) + n
        stats.setdefault("margins", []).extend(closest)
    return out


def _from_alone_prefills(model, tok, prompts: list[list[int]],
                         gen: GenSettings) -> tuple[list[_Answer], bool]:  # fmt: skip
    """Exact greedy answers of a batch (row-wise SDPA on): each prompt read alone, as generating
    it alone reads it (`generate` with one new token: the same call, so the same first token and
    keys), then the rest decoded as a batch over those keys, left-padded. Batching a prompt's
    tokens runs the matmuls with more rows than alone, which on some CPUs picks other kernels
    (bf16 with AMX from about 33 rows); decoding runs one row per prompt, few enough that such
    kernels may give each row what one row alone gets. Whether they do is checked on the
    batch's first decoding step (`_decodes_as_alone`); returns the answers and that."""
    kw = gen.kwargs(tok)
    firsts = [_prefill_alone(model, p, kw) for p in prompts]
    stops = kw["eos_token_id"] or []
    going = [r for r, (t, _) in enumerate(firsts) if t not in stops and gen.max_new_tokens > 1]
    answers = [_Answer(tok.decode([t], skip_special_tokens=True).strip(), [t], [])
               for t, _ in firsts]  # fmt: skip
    if not going:
        return answers, True
    rows = [prompts[r] + [firsts[r][0]] for r in going]
    width = max(len(prompts[r]) for r in going)
    caches = [firsts[r][1] for r in going]
    cache = _batched_cache(model, caches, width)
    ids, mask = left_padded(rows, tok.pad_token_id, model.device)
    rest = replace(gen, max_new_tokens=gen.max_new_tokens - 1)
    with _adapter_rows_alone(model):
        as_alone = len(going) == 1 or _decodes_as_alone(
            model, ids, mask, _batched_cache(model, caches, width), caches
        )
        decoded = _generate_batch(model, tok, rows, rest, cache=cache)
    for r, later in zip(going, decoded):
        first = answers[r].ids
        answers[r] = _Answer(tok.decode(first + later.new, skip_special_tokens=True).strip(),
                             first + later.ids, [float("inf")] + later.margins)  # fmt: skip
    return answers, as_alone


@torch.no_grad()
def _linears_round_rows_alike(model, rows: int) -> bool:
    """Whether each linear layer, as decoding runs it (`_adapter_rows_alone` on), gives every row
    of a `rows`-row input the bits it gives that row alone: one random input per kind of layer
    (shape, dtype, hooks). Where not (fp32 matmuls on CPUs measured so far), reading prompts
    alone cannot make the batch decode as alone, so exact batches read them together."""
    seen = set()
    with _adapter_rows_alone(model):
        for m in model.modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            kind = (m.weight.shape, m.weight.dtype, len(m._forward_hooks))
            if kind in seen:
                continue
            seen.add(kind)
            x = torch.randn(rows, 1, m.in_features, device=m.weight.device).to(m.weight.dtype)
            together = m(x)
            if not all(torch.equal(m(x[r : r + 1])[0], together[r]) for r in range(rows)):
                return False
    return True


@contextmanager
def _adapter_rows_alone(model):
    """For the time being, the adapter's linear layers held in another dtype than the base's
    (PEFT keeps LoRA in fp32 on a bf16 base) compute a batch's rows one at a time: fp32 matmuls
    round a row alone otherwise than in a batch on CPUs where bf16 ones do not, and LoRA's
    layers are small enough (rank x width) for that to cost little."""
    base = frozen_dtype(model)
    layers = [m for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".lora_" in n and m.weight.dtype != base]  # fmt: skip
    handles = [m.register_forward_hook(_rows_one_at_a_time) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _rows_one_at_a_time(module, args, out):
    """A forward hook: a linear layer's output computed row by row (the batch's is dropped)."""
    rows = args[0].reshape(-1, args[0].shape[-1])
    if rows.shape[0] == 1:
        return None
    alone = [torch.nn.functional.linear(row[None], module.weight, module.bias) for row in rows]
    return torch.cat(alone).view(out.shape)


def _prefill_alone(model, prompt: list[int], kw: dict) -> tuple[int, DynamicCache]:
    """The first answer token of a prompt generated alone, and the prompt's keys and values."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         **{**kw, "max_new_tokens": 1}, return_dict_in_generate=True)  # fmt: skip
    return int(out.sequences[0, -1]), out.cache


def _batched_cache(model, caches: list[DynamicCache], width: int) -> DynamicCache:
    """One cache of several prompts' caches, each left-padded with zeros to `width` positions
    (row-wise SDPA never reads them)."""
    batched = DynamicCache(config=model.config)
    for n in range(len(caches[0].layers)):
        keys, values = [], []
        for c in caches:
            k, v = c.layers[n].keys, c.layers[n].values
            pad = k.new_zeros(*k.shape[:2], width - k.shape[2], k.shape[3])
            keys.append(torch.cat([pad, k], dim=2))
            values.append(torch.cat([pad.to(v.dtype), v], dim=2))
        batched.update(torch.cat(keys), torch.cat(values), n)
    return batched


def _decodes_as_alone(model, ids: torch.Tensor, mask: torch.Tensor, batched: DynamicCache,
                      caches: list[DynamicCache]) -> bool:  # fmt: skip
    """Whether one decoding step of the batch (its last tokens, over `batched`) gives each row,
    in every module without submodules, the output that row's step alone (over its own cache in
    `caches`) gives, bit for bit. Whether a kernel rounds a row alone as in a batch depends on
    the shapes, which are the same at every later step (attention runs row by row on each row's
    own keys, as alone), and may depend on where the row sits (kernels take rows in blocks and
    the rows left over otherwise): every row is checked, each a one-token step alone, a few
    percent of decoding the batch. Consumes the caches in `caches`."""
    seen: list[dict[str, torch.Tensor]] = []

    def keep(name: str):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if torch.is_tensor(out):
                seen[-1].setdefault(name, out)

        return hook

    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(keep(n)) for n, m in leaves]
    try:
        seen.append({})
        _decode_step(model, ids[:, -1:], mask, batched)
        for r, cache in enumerate(caches):
            seen.append({})
            own = mask[r : r + 1, mask.shape[1] - int(mask[r].sum()) :]
            _decode_step(model, ids[r : r + 1, -1:], own, cache)
    finally:
        for h in handles:
            h.remove()
    rows = len(caches)
    compared = 0
    for r, alone in enumerate(seen[1:]):
        for name, a in alone.items():
            b = seen[0].get(name)
            if b is None or b.shape[0] != rows or a.shape[0] != 1 or b.shape[1:] != a.shape[1:]:
                continue
            if not torch.equal(a[0], b[r]):
                return False
            compared += 1
    return compared > 0


def _decode_step(model, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> None:
    """One decoding step as `generate` runs it: positions from the attention mask."""
    positions = mask.long().cumsum(-1)[:, -1:] - 1
    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
          cache=cache)  # fmt: skip


@dataclass
class _Answer:
    text: str
    ids: list[int]
    """The answer's tokens through its first stop token."""
    margins: list[float]
    """Each of those steps' margin in `_Margins` units (empty when not watched; inf for a token
    chosen alone)."""
    new: list[int] = field(default_factory=list)
    """Every token generated, padding after the stop included."""

    def last_near_tie(self, limit: float) -> int | None:
        near = [n for n, m in enumerate(self.margins) if m < limit]
        return near[-1] if near else None


def _alone(model, tok, prompt: list[int], gen: GenSettings, batched: _Answer, last: int) -> str:
    """The answer as generated alone. It stops early once it agrees with the batched answer
    through that answer's last near tie: past it the batched path had no near tie, so alone it
    goes on the same way and the batched text stands."""
    agreed = _Agreed(len(prompt), batched.ids[: last + 1])
    alone = _generate_batch(model, tok, [prompt], gen, StoppingCriteriaList([agreed]))[0]
    return batched.text if alone.ids[: last + 1] == agreed.prefix else alone.text


class _Agreed(StoppingCriteria):
    """True once a single row's new tokens start with `prefix`."""

    def __init__(self, start: int, prefix: list[int]):
        self.start, self.prefix = start, prefix

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        new = input_ids[0, self.start : self.start + len(self.prefix)].tolist()
        return torch.full((input_ids.shape[0],), new == self.prefix, device=input_ids.device)


class _Margins(LogitsProcessor):
    """Records, per greedy step and row, the gap between the best and the second-best score in
    units of the dtype's eps times the best score's size (at least 1); leaves the scores as
    they are."""

    def __init__(self, dtype: torch.dtype):
        self.eps, self.steps = torch.finfo(dtype).eps, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top = scores.float().topk(2, dim=-1).values
        self.steps.append((top[:, 0] - top[:, 1]) / (self.eps * top[:, 0].abs().clamp(min=1.0)))
        return scores


def left_padded(
    prompts: list[list[int]], pad_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` of prompts padded on the left to the longest."""
    width = max(len(p) for p in prompts)
    ids = [[pad_id] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _generate_batch(model, tok, prompts: list[list[int]], gen: GenSettings,
                    stopping: StoppingCriteriaList | None = None,
                    cache: DynamicCache | None = None) -> list[_Answer]:  # fmt: skip
    """One `generate` call over left-padded prompts (with `cache`: over the keys it holds of all
    but each prompt's last token); each answer's margins are recorded when there is something
    to compare with (a batch of several, greedy)."""
    input_ids, attention_mask = left_padded(prompts, tok.pad_token_id, model.device)
    width = input_ids.shape[1]
    kwargs = gen.kwargs(tok)
    margins = _Margins(frozen_dtype(model))
    if len(prompts) > 1 and not gen.do_sample:
        kwargs["logits_processor"] = LogitsProcessorList([margins])
    if stopping is not None:
        kwargs["stopping_criteria"] = stopping
    if cache is not None:
        kwargs["cache"] = cache
    new = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[:, width:]
    units = torch.stack(margins.steps, dim=1).tolist() if margins.steps else None
    answers = []
    for r, row in enumerate(new.tolist()):
        n = _answer_steps(row, kwargs["eos_token_id"])
        answers.append(_Answer(tok.decode(row, skip_special_tokens=True).strip(), row[:n],
                               units[r][:n] if units else [], row))  # fmt: skip
    return answers


def _answer_steps(new: list[int], stops: list[int] | None) -> int:
    """Steps that chose the answer's tokens: through its first stop token, else all of them."""
    for n, t in enumerate(new):
        if stops and t in stops:
            return n + 1
    return len(new)


def stream(model, tok, messages: list[dict], gen: GenSettings) -> Iterator[str]:
    """Text pieces as they are generated (for `lorasft chat`)."""
    input_ids = torch.tensor([prompt_ids(messages, tok)], device=model.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  streamer=streamer, **gen.kwargs(tok))  # fmt: skip
    failure: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**kwargs)
        except Exception as e:  # noqa: BLE001 (re-raised in the caller's thread below)
            failure.append(e)
            streamer.end()  # else the consumer waits forever for text that never comes

    thread = Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failure:
        raise failure[0]
