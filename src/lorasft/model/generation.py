"""Generation settings: what every caller of `model.generate` (evaluation, `generate`, `chat`,
`verify`, passkey retrieval, the server) passes it, built in one place."""

from __future__ import annotations

from dataclasses import dataclass, replace

from lorasft.data.tokenize import stop_ids

GREEDY_BELOW = 1e-6
"""Temperatures below this are greedy: dividing logits by a temperature such as 1e-300 overflows
to inf and the sampler's probabilities to NaN (found by tests/serve/test_fuzz_http.py), and at
1e-6 a logit gap of 1e-5 already weighs e^10 to 1, the argmax in all but exact ties."""


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
        """A request's temperature: below GREEDY_BELOW (0 included) greedy, else samples at it;
        None keeps these."""
        if temperature is None:
            return self
        sample = temperature >= GREEDY_BELOW
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
