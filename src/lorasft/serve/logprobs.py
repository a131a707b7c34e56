"""Token log-probabilities as the OpenAI API returns them.

Every engine reports the model's own distribution: the log-softmax of its logits before
temperature and top-p (what vLLM and llama-server return by default), so a client reads the same
numbers whatever it sampled with. `TokenScore` is one position: the token there, its
log-probability, and the `k` most likely tokens with theirs; the prompt's first token has none
(nothing predicts it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorasft.serve.textstream import _bytes_to_unicode

MAX_TOP = 20  # the most alternatives a request may ask for (OpenAI's bound for chat)


@dataclass
class TokenScore:
    token: int
    logprob: float | None
    top: list[tuple[int, float]]


def scores_from_logits(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenScore]:
    """`logits[i]` is the distribution the model gave for `tokens[i]`."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    return [TokenScore(t, c, list(zip(i, v)))
            for t, c, i, v in zip(tokens, chosen, top_i.tolist(), top_v.tolist())]  # fmt: skip


def prompt_scores_from_logits(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenScore]:
    """A prompt's scores from its logits at every position (`logits[i]` predicts `ids[i + 1]`):
    the first token has none, nothing predicts it; the last position's logits are not used."""
    return [TokenScore(ids[0], None, []), *scores_from_logits(logits[: len(ids) - 1], ids[1:], k)]


_BYTE_OF = {ch: b for b, ch in enumerate(_bytes_to_unicode())}


def token_bytes(tok, token: int) -> list[int]:
    """The token's own bytes: exact for byte-level BPE (a token may hold part of a character),
    else the UTF-8 of its text."""
    piece = tok.convert_ids_to_tokens(token)
    if isinstance(piece, str) and piece and all(ch in _BYTE_OF for ch in piece):
        return [_BYTE_OF[ch] for ch in piece]
    return list(tok.decode([token]).encode("utf-8"))


def token_text(tok, token: int) -> str:
    return tok.decode([token])


def chat_content(tok, scores: list[TokenScore]) -> list[dict]:
    """`choices[i].logprobs.content` of a chat completion (or of one streamed chunk)."""

    def entry(token: int, logprob: float) -> dict:
        return {"token": token_text(tok, token), "logprob": logprob,
                "bytes": token_bytes(tok, token)}  # fmt: skip

    return [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
            for s in scores]  # fmt: skip


def completion_logprobs(tok, scores: list[TokenScore], offset: int = 0) -> dict:
    """`choices[i].logprobs` of a text completion: tokens, their log-probabilities, the top
    alternatives by token text, and each token's character offset in the returned text."""
    tokens, offsets, at = [], [], offset
    for s in scores:
        text = token_text(tok, s.token)
        tokens.append(text)
        offsets.append(at)
        at += len(text)
    # alternatives keyed by text, most likely first (two ids of one text: the likelier kept)
    tops = [None if s.logprob is None else
            dict(sorted({token_text(tok, t): lp for t, lp in reversed(s.top)}.items(),
                        key=lambda kv: -kv[1]))
            for s in scores]  # fmt: skip
    return {"tokens": tokens, "token_logprobs": [s.logprob for s in scores],
            "top_logprobs": tops, "text_offset": offsets}  # fmt: skip
