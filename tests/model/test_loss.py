"""lorasft's loss: the chunked output head and cross-entropy give the loss and every trainable
gradient of the whole-vocabulary path, never holding more than one chunk of logits."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorasft.config import LoraSection
from lorasft.data.collate import PadCollator
from lorasft.model.load import accepts_logits_to_keep
from lorasft.model.lora import apply_lora
from lorasft.model.loss import (
    LossSettings,
    causal_lm_loss,
    check_kernel,
    chunks_nll,
    supervised_nll,
    supervised_positions,
)
from tests.conftest import BF16_U, LORA_TARGETS, PRECISIONS

OFF = LossSettings(kernel="off")


def test_supervised_positions():
    labels = torch.tensor([[-100, -100, 7, 8, -100]])
    assert supervised_positions(labels).tolist() == [[False, True, True, False, False]]


def _batch():
    return PadCollator(pad_token_id=2)([
        {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, 8, 9, 10]},
        {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]},
    ])  # fmt: skip


def _lora(model, **extra):
    kind = model.config.model_type
    targets = LORA_TARGETS[kind].strip("[]").split(",")
    return apply_lora(model, LoraSection(target_modules=targets, dropout=0.0, **extra))


def test_loss_on_kept_logits_equals_the_models_own_loss(tiny_model_dir):
    model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert accepts_logits_to_keep(model)
    batch = _batch()
    full = model(**batch).loss
    off, out = causal_lm_loss(model, batch, None, OFF)
    assert out.logits.shape[0] == 5  # only the 5 positions that predict a supervised token
    assert torch.allclose(off, full, atol=1e-6)
    chunked, out = causal_lm_loss(model, batch, None, LossSettings(chunk_tokens=2))
    assert out.logits.shape[0] == 0  # the head ran outside the forward, in chunks
    assert torch.allclose(chunked, full, atol=1e-6)
    # With gradient accumulation the divisor is the token count of the whole accumulated batch.
    assert torch.allclose(causal_lm_loss(model, batch, 10)[0], full * 5 / 10, atol=1e-6)


def _long_batch(vocab: int, seed: int = 0):
    """Two rows of 40 and 29 tokens, most of them supervised, as long raw text is."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 40), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 29:] = -100
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _tied_model(tiny_llama_dir, precision: str, modules_to_save: list[str]):
    """The default model's shape of the problem: tied input and output embeddings, trained in full
    (LongLoRA's trainable embeddings) next to LoRA and the norms."""
    config = AutoConfig.from_pretrained(tiny_llama_dir, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.to(torch.float32 if precision == "fp32" else torch.bfloat16)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model = _lora(model, modules_to_save=modules_to_save)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which leaves A without a gradient
            p.data.normal_(0, 0.05)
    return model


def _loss_and_grads(model, batch, loss: LossSettings):
    model.zero_grad(set_to_none=True)
    value, _ = causal_lm_loss(model, batch, None, loss)
    value.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g.abs().max() > 0 for g in grads.values())  # every trainable tensor got a gradient
    return value.detach().float(), grads


def _loss_tolerance(precision: str) -> float:
    """Relative difference allowed between the chunked and whole paths' loss.

    fp32: the same products, the chunks' sums added in another order: ~1e-7 relative (measured
    7e-8); 1e-5 is far above it. bf16: both paths compute each row's logits from the same bf16
    operands and take the cross-entropy in fp32 (measured 7e-8 here); a CPU or GPU kernel that
    blocks a chunk's rows differently may round a logit one ulp (2u relative) the other way, which
    moves a token's loss by far less than u; u = 0.39% bounds it. A chunk boundary off by one (the
    control below) moves the loss by 6.7%."""
    return 1e-5 if precision == "fp32" else BF16_U


def _grad_tolerance(precision: str) -> float:
    """Relative (Frobenius) difference allowed between the two paths' gradients.

    fp32: summation order only (measured at most 3.6e-7); 1e-5. bf16: a bf16 weight the head uses
    (lm_head trained in full) gets each chunk's gradient rounded to bf16 and the chunks added in
    bf16, one rounding (u) per chunk, which in norm grows like sqrt(k) u for k chunks: at most
    10 chunks in these tests, so 4u = 1.6% (measured 1.2u with 10 chunks, 0.5u with 2)."""
    return 1e-5 if precision == "fp32" else 4 * BF16_U


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("modules", [["embed_tokens", "norm"], ["lm_head"]], ids=["embed", "head"])
@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_chunked_loss_and_gradients_equal_the_whole_vocabulary_path(
    tiny_llama_dir, precision, modules, chunk
):
    model = _tied_model(tiny_llama_dir, precision, modules)
    batch = _long_batch(model.config.vocab_size)
    want, want_grads = _loss_and_grads(model, batch, OFF)
    got, got_grads = _loss_and_grads(model, batch, LossSettings(chunk_tokens=chunk))
    assert abs(got - want) <= _loss_tolerance(precision) * want
    assert got_grads.keys() == want_grads.keys()
    worst = max(_rel(got_grads[n], want_grads[n]) for n in want_grads)
    assert worst <= _grad_tolerance(precision), worst


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_chunk_boundary_off_by_one_is_caught(tiny_llama_dir, precision):
    """The control: pairing the second chunk's hidden states with targets one position early
    must land far outside the tolerance the equality tests allow."""
    model = _tied_model(tiny_llama_dir, precision, ["embed_tokens"])
    batch = _long_batch(model.config.vocab_size)
    want, _, _ = supervised_nll(model, batch, loss=OFF)
    from lorasft.model.loss import head_input, unwrapped

    head = unwrapped(model).get_output_embeddings()
    keep = supervised_positions(batch["labels"])
    targets = batch["labels"][:, 1:][keep[:, :-1]]
    with head_input(head) as captured:
        model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=keep)
    hidden, c = captured[0], 16
    chunks = [hidden[:c], hidden[c : 2 * c], hidden[2 * c :]]
    right = chunks_nll(head, chunks, [targets[:c], targets[c : 2 * c], targets[2 * c :]])
    assert abs(right - want) <= _loss_tolerance(precision) * want
    shifted = [targets[:c], targets[c - 1 : 2 * c - 1], targets[2 * c - 1 : -1]]
    wrong = chunks_nll(head, chunks, shifted)
    assert abs(wrong - want) > 10 * _loss_tolerance(precision) * want


def test_the_head_never_sees_more_than_one_chunk(tiny_llama_dir):
    """No call of the head ever has more rows than a chunk, each chunk runs once (its gradients are
    taken then, nothing is recomputed in the backward pass), and the whole-vocabulary path (the
    control) runs the head once on every position."""
    model = _tied_model(tiny_llama_dir, "fp32", ["embed_tokens"])
    head, rows = model.get_output_embeddings(), []
    handle = head.register_forward_hook(
        lambda _m, _a, out: rows.append(out.reshape(-1, out.size(-1)).size(0))
    )
    batch = _long_batch(model.config.vocab_size)
    _loss_and_grads(model, batch, LossSettings(chunk_tokens=8))
    n = int(supervised_positions(batch["labels"]).sum())
    # the forward's own call (0 rows), then each chunk once
    assert rows[0] == 0 and max(rows) == 8 and sum(rows) == n
    rows.clear()
    _loss_and_grads(model, batch, OFF)
    handle.remove()
    assert rows == [n]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_perplexity_is_the_same_with_and_without_chunks(tiny_model_dir, tiny_tokenizer, precision):
    from lorasft.eval.perplexity import perplexity
    from lorasft.eval.sliding import same_tokens_perplexity

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype))
    batch = _long_batch(model.config.vocab_size)
    from lorasft.data.tokenize import Encoded

    enc = [Encoded(input_ids=r.tolist(), labels=r.tolist()) for r in batch["input_ids"]]
    tol = _loss_tolerance(precision)
    a = perplexity(model, enc, 2, loss=OFF)["loss"]
    b = perplexity(model, enc, 2, loss=LossSettings(chunk_tokens=5))["loss"]
    assert a == pytest.approx(b, rel=tol, abs=1e-5)
    ids = batch["input_ids"].flatten().tolist()
    a = same_tokens_perplexity(model, ids, [40, 80], 20, 1, loss=OFF)
    b = same_tokens_perplexity(model, ids, [40, 80], 20, 1, loss=LossSettings(chunk_tokens=6))
    for n in ("40", "80"):
        assert a[n]["loss"] == pytest.approx(b[n]["loss"], rel=tol, abs=1e-5)


def test_logit_softcapping_is_applied_in_chunks(tiny_tokenizer):
    """Gemma-2's head caps its logits (tanh); the chunked path must do the same."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, final_logit_softcapping=1.0)  # fmt: skip
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # logits of a few units, which a cap of 1 bends
        model.get_output_embeddings().weight.mul_(300)
    batch = _long_batch(cfg.vocab_size)
    off, _, _ = supervised_nll(model, batch, loss=OFF)
    chunked, _, _ = supervised_nll(model, batch, loss=LossSettings(chunk_tokens=9))
    assert torch.allclose(off, chunked, rtol=1e-5)
    model.config.final_logit_softcapping = None  # the control: the cap matters here
    assert not torch.allclose(off, supervised_nll(model, batch, loss=OFF)[0], rtol=1e-2)


def test_kernels_that_cannot_run_here_are_config_errors():
    if not torch.cuda.is_available():
        assert "CUDA" in check_kernel("liger", 1024)
        assert "CUDA" in check_kernel("cce", 1024)
    assert "loss_chunk_tokens > 0" in check_kernel("chunked", 0)
    assert check_kernel("auto", 0) is None and check_kernel("chunked", 512) is None
