import torch
from transformers import AutoModelForCausalLM

from lorasft.config import LoraSection
from lorasft.data.collate import PadCollator
from lorasft.model.lora import apply_lora
from lorasft.train.trainer import accepts_logits_to_keep, causal_lm_loss, supervised_positions
from tests.conftest import LORA_TARGETS


def test_supervised_positions():
    labels = torch.tensor([[-100, -100, 7, 8, -100]])
    assert supervised_positions(labels).tolist() == [[False, True, True, False, False]]


def test_loss_on_kept_logits_equals_the_models_own_loss(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    kind = model.config.model_type
    model = apply_lora(model, LoraSection(target_modules=LORA_TARGETS[kind].strip("[]").split(",")))
    assert accepts_logits_to_keep(model)
    batch = PadCollator(pad_token_id=2)([
        {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, 8, 9, 10]},
        {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]},
    ])  # fmt: skip
    full = model(**batch).loss
    ours, out = causal_lm_loss(model, batch, None)
    assert out.logits.shape[0] == 5  # only the 5 positions that predict a supervised token
    assert torch.allclose(ours, full, atol=1e-6)
    # With gradient accumulation the divisor is the token count of the whole accumulated batch.
    assert torch.allclose(causal_lm_loss(model, batch, 10)[0], full * 5 / 10, atol=1e-6)
