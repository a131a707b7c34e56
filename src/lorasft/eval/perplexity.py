"""Token-weighted loss and perplexity over the supervised (response) tokens only."""

from __future__ import annotations

import math

import torch

from lorasft.data.collate import PadCollator
from lorasft.data.tokenize import Encoded
from lorasft.model.load import accepts_logits_to_keep
from lorasft.model.loss import DEFAULT_LOSS, LossSettings, supervised_nll


def token_batches(lengths: list[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Indices of `lengths` shortest first, in batches of at most `batch_size` rows whose padded
    size (rows x the longest) is at most `batch_tokens`; a row longer than that goes alone."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (len(last) + 1) * lengths[i] <= batch_tokens:
            last.append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def perplexity(model, encoded: list[Encoded], pad_token_id: int, batch_size: int = 8,
               loss: LossSettings = DEFAULT_LOSS, batch_tokens: int | None = None) -> dict:  # fmt: skip
    """Sum of token NLLs / number of supervised tokens. (Trainer's eval_loss averages batch means,
    which weighs a short batch like a long one.) The output head runs only where a supervised token
    is predicted, in `loss`'s chunks (`supervised_nll`, the training loss's own computation).
    Batches: `token_batches` (None: no token bound)."""
    if not encoded:
        return {"loss": None, "perplexity": None, "tokens": 0}
    model.eval()
    collate = PadCollator(pad_token_id)
    lengths = [len(e) for e in encoded]
    total, count, head_only = 0.0, 0, accepts_logits_to_keep(model)
    for rows in token_batches(lengths, batch_size, batch_tokens or sum(lengths)):
        batch = collate([vars(encoded[i]) for i in rows])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        nll, n, _ = supervised_nll(model, batch, head_only, loss)
        total += nll.item()
        count += n
    loss = total / count if count else float("nan")
    return {"loss": round(loss, 5), "perplexity": round(math.exp(loss), 4), "tokens": count}
