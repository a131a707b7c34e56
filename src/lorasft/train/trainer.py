"""Trainer with the loss computed only where it is taken.

The output head of a 49k-vocabulary model is about a fifth of the forward compute, and the
instruction data's loss covers ~20% of positions; projecting only the positions that predict a
supervised token (transformers' `logits_to_keep` with a boolean mask) gives the same loss for less.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

from lorasft.data.tokenize import IGNORE
from lorasft.model.load import accepts_logits_to_keep


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: position t is kept when token t+1 is in the loss."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def causal_lm_loss(model, inputs: dict, num_items: torch.Tensor | int | None):
    """Sum of token NLL over supervised positions / num_items (the tokens of the whole
    accumulated batch, so gradient accumulation weighs every token alike)."""
    labels = inputs["labels"]
    keep = supervised_positions(labels)
    fwd = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**fwd, logits_to_keep=keep, use_cache=False)
    targets = labels[:, 1:][keep[:, :-1]]
    logits = outputs.logits.reshape(-1, outputs.logits.size(-1))
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    denom = num_items if num_items is not None else max(targets.numel(), 1)
    return loss / denom, outputs


class SupervisedTrainer(Trainer):
    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not accepts_logits_to_keep(self.accelerator.unwrap_model(model)):
            self.loss_is_scaled_for_ga = None  # the model's own loss: let Trainer scale it
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = causal_lm_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer does for the model's own loss
        return (loss, outputs) if return_outputs else loss
