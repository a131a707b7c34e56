"""Token-weighted loss and perplexity over the supervised (response) tokens only."""

from __future__ import annotations

import math

import torch

from lorasft.data.collate import PadCollator
from lorasft.data.tokenize import Encoded
from lorasft.model.load import accepts_logits_to_keep
from lorasft.model.loss import DEFAULT_LOSS, LossSettings, supervised_nll


@torch.no_grad()
def perplexity(model, encoded: list[Encoded], pad_token_id: int, batch_size: int = 8,
               loss: LossSettings = DEFAULT_LOSS) -> dict:  # fmt: skip
    """Sum of token NLLs / number of supervised tokens. (Trainer's eval_loss averages batch means,
    which weighs a short batch like a long one.) The output head runs only where a supervised token
    is predicted, in `loss`'s chunks (`supervised_nll`, the training loss's own computation)."""
    if not encoded:
        return {"loss": None, "perplexity": None, "tokens": 0}
    model.eval()
    collate = PadCollator(pad_token_id)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    total, count, head_only = 0.0, 0, accepts_logits_to_keep(model)
    for start in range(0, len(order), batch_size):
        batch = collate([vars(encoded[i]) for i in order[start : start + batch_size]])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        nll, n, _ = supervised_nll(model, batch, head_only, loss)
        total += nll.item()
        count += n
    loss = total / count if count else float("nan")
    return {"loss": round(loss, 5), "perplexity": round(math.exp(loss), 4), "tokens": count}
