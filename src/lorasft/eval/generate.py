"""Batched generation from conversations through the shared prompt builder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from lorasft.data.templates import build_prompt
from lorasft.data.tokenize import stop_ids


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

    @classmethod
    def from_config(cls, ev) -> GenSettings:
        return cls(
            ev.max_new_tokens, ev.do_sample, ev.temperature, ev.top_k, ev.top_p, ev.batch_size
        )

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


@torch.no_grad()
def generate(model, tok, conversations: list[list[dict]], gen: GenSettings,
             base: bool = False) -> list[str]:  # fmt: skip
    """Responses in input order; `base=True` runs with the LoRA adapter disabled."""
    model.eval()
    prompts = [encode_prompt(m, tok) for m in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    ctx = model.disable_adapter() if base else nullcontext()
    with ctx:
        for s in range(0, len(order), gen.batch_size):
            idx = order[s : s + gen.batch_size]
            for i, text in zip(idx, _generate_batch(model, tok, [prompts[i] for i in idx], gen)):
                out[i] = text
    return out


def _generate_batch(model, tok, prompts: list[list[int]], gen: GenSettings) -> list[str]:
    width = max(len(p) for p in prompts)
    ids = [[tok.pad_token_id] * (width - len(p)) + p for p in prompts]  # left padding
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    input_ids = torch.tensor(ids, device=model.device)
    attention_mask = torch.tensor(mask, device=model.device)
    seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen.kwargs(tok))
    return [tok.decode(s[width:], skip_special_tokens=True).strip() for s in seqs]


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
