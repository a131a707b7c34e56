"""Batched generation from conversations through the shared prompt builder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from threading import Thread

import torch
from transformers import (
    AttentionInterface,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lorasft.data.templates import build_prompt
from lorasft.data.tokenize import stop_ids
from lorasft.model.run import frozen_dtype


@dataclass
class GenSettings:
    """Generation settings, and the one rule for them: temperature 0 (or do_sample false) is
    greedy, free of the model's own sampling defaults; eval, generate, chat, verify, passkey and
    the server all build their `generate` arguments here."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    batch_size: int = 8
    exact: bool = True
    """Greedy batched answers as generated one at a time (`generate`'s near-tie check)."""

    @classmethod
    def from_config(cls, ev) -> GenSettings:
        return cls(ev.max_new_tokens, ev.do_sample, ev.temperature, ev.top_k, ev.top_p,
                   ev.batch_size, ev.exact_greedy)  # fmt: skip

    @classmethod
    def greedy(cls, max_new_tokens: int) -> GenSettings:
        return cls(max_new_tokens=max_new_tokens)

    def with_temperature(self, temperature: float | None, top_p: float | None = None,
                         top_k: int | None = None) -> GenSettings:  # fmt: skip
        """A request's temperature: 0 means greedy, above 0 samples at it; None keeps these."""
        if temperature is None:
            return self
        sample = temperature > 0
        return replace(self, do_sample=sample, temperature=temperature if sample else 1.0,
                       top_p=self.top_p if top_p is None else top_p,
                       top_k=self.top_k if top_k is None else top_k)  # fmt: skip

    def kwargs(self, tok, eos: list[int] | None = None) -> dict:
        """`generate` arguments; it stops at the run's stop ids (or `eos`, a target's own)."""
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
              "eos_token_id": stop_ids(tok) if eos is None else (eos or None),
              "pad_token_id": tok.pad_token_id}  # fmt: skip
        if self.do_sample:
            kw.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:  # keep greedy free of the model's own sampling defaults
            kw.update(temperature=None, top_k=None, top_p=None)
        return kw


def encode_prompt(messages: list[dict], tok) -> list[int]:
    return tok(build_prompt(messages, tok), add_special_tokens=False).input_ids


# A greedy step whose best and second-best logits are closer than this may go either way when the
# same row is computed in a batch instead of alone: a batch's matmuls run other kernels than one
# row's, so every layer rounds differently. (Padding no longer does: `_rowwise_sdpa`.) Measured in
# units of the base's dtype eps times the best logit's size (at least 1); in bf16 one unit is one
# to two steps of the grid the logits lie on. On the demo run (bench/eval_speed.py, 2026-12-02),
# exact batching's path without this check parted from one-at-a-time answers on 7 of 64 rows,
# the same 7 in batches of 8 and of 32, at closest calls of 0 (5 rows), 0.70 and 1.95 units:
# the bound is twice the largest. (With plain SDPA in batches of 32 one row had parted at 2.39.)
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
    It sets the model's attention for the time being: no other thread may use the model then."""
    if gen.do_sample or not gen.exact or not _full_causal_sdpa(model):
        yield
        return
    model.set_attn_implementation(ROWWISE)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


@torch.no_grad()
def generate(model, tok, conversations: list[list[dict]], gen: GenSettings, base: bool = False,
             stats: dict | None = None) -> list[str]:  # fmt: skip
    """Responses in input order; `base=True` runs with the LoRA adapter disabled.

    Greedy answers equal those generated one at a time: prompts are batched (left padding, by
    length; on SDPA models each row's attention skips its padding, `_rowwise_sdpa`), and a row
    whose path passed a near tie (`NEAR_TIE_EPS`) is generated again alone (unless `gen.exact`
    is false).
    `stats`, when given, adds up `redone_alone` (how many) and extends `margins` (per
    conversation, its batched path's closest call in `_Margins` units; None where not watched)."""
    model.eval()
    prompts = [encode_prompt(m, tok) for m in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    closest: list[float | None] = [None] * len(prompts)
    redone, limit = 0, near_tie_limit(frozen_dtype(model))
    ctx = model.disable_adapter() if base else nullcontext()
    with ctx, _padding_free_attention(model, gen):
        for s in range(0, len(order), gen.batch_size):
            idx = order[s : s + gen.batch_size]
            for i, answer in zip(idx, _generate_batch(model, tok, [prompts[i] for i in idx], gen)):
                last = answer.last_near_tie(limit)
                if last is not None and gen.exact:
                    answer.text = _alone(model, tok, prompts[i], gen, answer, last)
                    redone += 1
                out[i], closest[i] = answer.text, min(answer.margins, default=None)
    if stats is not None:
        stats["redone_alone"] = stats.get("redone_alone", 0) + redone
        stats.setdefault("margins", []).extend(closest)
    return out


@dataclass
class _Answer:
    text: str
    ids: list[int]
    """The answer's tokens through its first stop token."""
    margins: list[float]
    """Each of those steps' margin in `_Margins` units (empty when not watched)."""

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
                    stopping: StoppingCriteriaList | None = None) -> list[_Answer]:  # fmt: skip
    """One `generate` call over left-padded prompts; each answer's margins are recorded when
    there is something to compare with (a batch of several, greedy)."""
    input_ids, attention_mask = left_padded(prompts, tok.pad_token_id, model.device)
    width = input_ids.shape[1]
    kwargs = gen.kwargs(tok)
    margins = _Margins(frozen_dtype(model))
    if len(prompts) > 1 and not gen.do_sample:
        kwargs["logits_processor"] = LogitsProcessorList([margins])
    if stopping is not None:
        kwargs["stopping_criteria"] = stopping
    new = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[:, width:]
    units = torch.stack(margins.steps, dim=1).tolist() if margins.steps else None
    answers = []
    for r, row in enumerate(new.tolist()):
        n = _answer_steps(row, kwargs["eos_token_id"])
        answers.append(_Answer(tok.decode(row, skip_special_tokens=True).strip(), row[:n],
                               units[r][:n] if units else []))  # fmt: skip
    return answers


def _answer_steps(new: list[int], stops: list[int] | None) -> int:
    """Steps that chose the answer's tokens: through its first stop token, else all of them."""
    for n, t in enumerate(new):
        if stops and t in stops:
            return n + 1
    return len(new)


def stream(model, tok, messages: list[dict], gen: GenSettings) -> Iterator[str]:
    """Text pieces as they are generated (for `lorasft chat`)."""
    input_ids = torch.tensor([encode_prompt(messages, tok)], device=model.device)
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
