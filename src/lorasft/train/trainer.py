"""Trainer whose loss is lorasft's (`lorasft.model.loss`): response tokens only, the output head
only where a supervised token is predicted, in chunks of positions."""

from __future__ import annotations

from transformers import Trainer

from lorasft.model.load import accepts_logits_to_keep
from lorasft.model.loss import LossSettings, causal_lm_loss, unwrapped


class GenerationScores:
    """Generation metrics of the model being trained, on the first eval records (greedy, the
    run's template and stop ids): what a generation metric_for_best_model is read from."""

    def __init__(self, tok, examples, gen, limit: int):
        from lorasft.eval.evaluate import chat_samples

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
    loss_settings: LossSettings = LossSettings()

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
        if not accepts_logits_to_keep(unwrapped(model)):
            self.loss_is_scaled_for_ga = None  # the model's own loss: let Trainer scale it
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = causal_lm_loss(model, inputs, num_items_in_batch, self.loss_settings)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer does for the model's own loss
        return (loss, outputs) if return_outputs else loss
