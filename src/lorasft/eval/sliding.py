"""Perplexity by context length: sliding windows, and the same tokens read with more or less context.

Windows of `length` tokens advance by `stride`; each window scores only the tokens it adds
(the first window scores all of its tokens but the first), so every scored token after the
first window sees at least `length - stride` tokens of context. This is the protocol of the
position-interpolation and YaRN papers and of the transformers perplexity guide.
"""

from __future__ import annotations

import math

import torch

from lorasft.data.tokenize import IGNORE
from lorasft.model.load import accepts_logits_to_keep
from lorasft.model.loss import DEFAULT_LOSS, LossSettings, supervised_nll


def windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window; the scored tokens are the last `scored` of the window."""
    if not 0 < stride <= length:
        raise ValueError(f"stride={stride}: must be between 1 and the length ({length})")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        # a window's first token has no context inside it, so it is never scored
        scored = min(end - prev_end, end - begin - 1)
        out.append((begin, end, scored))
        prev_end = end
        if end == n:
            break
    return out


def forward_kwargs(model, keep: int) -> dict:
    """Ask for the logits of the last `keep` positions only when the model can
    (`logits_to_keep`): at 16k tokens the full logits of a 49k vocabulary take 3 GB."""
    return {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, scored: int, loss: LossSettings = DEFAULT_LOSS) -> float:
    """Summed NLL of the last `scored` tokens of `ids` (1-D), each predicted from all before it:
    the loss of training (`supervised_nll`) with the other tokens out of the labels, so the head
    runs on the scored positions alone, in `loss`'s chunks."""
    labels = ids.clone()
    labels[: len(ids) - scored] = IGNORE
    batch = {"input_ids": ids[None].to(model.device), "labels": labels[None].to(model.device)}
    nll, _, _ = supervised_nll(model, batch, accepts_logits_to_keep(model), loss)
    return nll.item()


def sliding_perplexity(model, ids: list[int], length: int, stride: int,
                       max_windows: int | None = None, loss: LossSettings = DEFAULT_LOSS) -> dict:  # fmt: skip
    """Perplexity of `ids` read in windows of `length`; `max_windows` caps the tokens read."""
    if len(ids) < length:
        return {"perplexity": None, "reason": f"only {len(ids)} tokens of long text (< {length})"}
    if max_windows:
        ids = ids[: length + (max_windows - 1) * stride]
    model.eval()
    seq = torch.tensor(ids)
    total, count = 0.0, 0
    wins = windows(len(ids), length, stride)
    for begin, end, scored in wins:
        total += window_nll(model, seq[begin:end], scored, loss)
        count += scored
    mean = total / count
    return {"loss": round(mean, 5), "perplexity": round(math.exp(mean), 4), "tokens": count,
            "windows": len(wins)}  # fmt: skip


def tail_windows(n_tokens: int, longest: int, windows: int) -> list[int]:
    """End positions of the scored spans: every `longest` tokens, as many as fit (at most
    `windows`), so each end has `longest` tokens before it and the spans never overlap."""
    return [longest * (k + 1) for k in range(windows) if longest * (k + 1) <= n_tokens]


def same_tokens_perplexity(model, ids: list[int], lengths: list[int], scored: int, windows: int,
                           longest: int | None = None,
                           loss: LossSettings = DEFAULT_LOSS) -> dict[str, dict]:  # fmt: skip
    """Perplexity by context length on the *same* tokens: at each end point the last `scored`
    tokens are predicted with `n` tokens of context in the window for each n in `lengths`, so a
    row compares lengths on one set of tokens (a lower value at a longer length means the model
    used the extra context). `longest` (default: the largest length) places the end points, so
    models that cannot read every length still score the same tokens as the others."""
    longest = longest or max(lengths)
    if scored >= min(lengths):
        raise ValueError(f"scored={scored}: must be below the shortest length ({min(lengths)})")
    ends = tail_windows(len(ids), longest, windows)
    if not ends:
        reason = f"only {len(ids)} tokens of long text (< {longest})"
        return {str(n): {"perplexity": None, "reason": reason} for n in lengths}
    model.eval()
    seq, out = torch.tensor(ids), {}
    for n in lengths:
        total = sum(window_nll(model, seq[end - n : end], scored, loss) for end in ends)
        mean = total / (scored * len(ends))
        out[str(n)] = {"loss": round(mean, 5), "perplexity": round(math.exp(mean), 4),
                       "tokens": scored * len(ends), "windows": len(ends)}  # fmt: skip
    return out
