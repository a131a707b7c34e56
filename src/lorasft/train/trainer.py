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


def supervised_nll(model, inputs: dict, head_only: bool = True) -> tuple[torch.Tensor, int, object]:
    """`(summed NLL, count, outputs)` over the supervised tokens (labels other than IGNORE), each
    predicted from the tokens before it. `head_only`: the output head runs only at the positions
    that predict one (the model must take `logits_to_keep`: `accepts_logits_to_keep` of the model
    unwrapped, since a DDP or DeepSpeed wrapper's forward hides it), else on all of them."""
    labels = inputs["labels"]
    keep = supervised_positions(labels)
    fwd = {k: v for k, v in inputs.items() if k != "labels"}
    if head_only:
        outputs = model(**fwd, logits_to_keep=keep, use_cache=False)
        logits = outputs.logits.reshape(-1, outputs.logits.size(-1))
    else:
        outputs = model(**fwd, use_cache=False)
        logits = outputs.logits[keep]
    targets = labels[:, 1:][keep[:, :-1]]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel(), outputs


def causal_lm_loss(model, inputs: dict, num_items: torch.Tensor | int | None):
    """Sum of token NLL over supervised positions / num_items (the tokens of the whole
    accumulated batch, so gradient accumulation weighs every token alike)."""
    nll, count, outputs = supervised_nll(model, inputs)
    return nll / (num_items if num_items is not None else max(count, 1)), outputs


class GenerationScores:
    """Generation metrics of the model being trained, on the first eval records (greedy, the
    run's template and stop ids): what a generation metric_for_best_model is read from."""

    def __init__(self, tok, examples, gen, limit: int):
        from lorasft.eval.run import chat_samples

        self.tok, self.gen = tok, gen
        _, self.prompts, self.refs = chat_samples(examples, limit)

    def __call__(self, model) -> dict[str, float]:
        from lorasft.eval.generate import generate
        from lorasft.eval.metrics import aggregate

        training = model.training
        answers = generate(model, self.tok, self.prompts, self.gen)  # in eval mode
        model.train(training)
        return {k: v for k, v in aggregate(answers, self.refs).items() if k != "n"}


class SupervisedTrainer(Trainer):
    loss_is_scaled_for_ga = True
    generation_scores: GenerationScores | None = None

    def evaluation_loop(self, *args, **kwargs):
        """The eval loss, plus generation metrics when one picks the best checkpoint: added before
        the Trainer logs them and the callbacks (early stopping) read them."""
        output = super().evaluation_loop(*args, **kwargs)
        if self.generation_scores is not None:
            prefix = kwargs.get("metric_key_prefix", "eval")
            scores = self.generation_scores(self.accelerator.unwrap_model(self.model))
            output.metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not accepts_logits_to_keep(self.accelerator.unwrap_model(model)):
            self.loss_is_scaled_for_ga = None  # the model's own loss: let Trainer scale it
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = causal_lm_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer does for the model's own loss
        return (loss, outputs) if return_outputs else loss
