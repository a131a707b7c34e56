import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lorasft.data.tokenize import IGNORE, Encoded
from lorasft.eval.perplexity import perplexity, token_batches
from lorasft.model.load import accepts_logits_to_keep

SEQS = [
    Encoded([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9]),
    Encoded([10, 11, 12], [IGNORE, 11, IGNORE]),
]


class WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward does not take `logits_to_keep` (older or remote-code models)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.device = model, model.device

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


# Every sequence alone, the full logits, one supervised token at a time: the reference. In fp32 the
# batched, padded, head-only-where-needed sum agrees to rounding (1e-4 on a loss of ~6.4). In bf16 the
# logits themselves are rounded to 8 significant bits (a relative 2**-8 = 0.4% of a logit of ~1-5,
# up to ~0.03) and padding changes the attention sums, so a loss of ~6.4 may move by a few hundredths:
# bound 0.05, still far below a wrong token or a prompt token counted (each moves it by ~1).
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_token_weighted_over_supervised_tokens_only(tiny_llama_dir, dtype, tol):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype)
    total, n = 0.0, 0
    with torch.no_grad():
        for e in SEQS:
            logits = model(torch.tensor([e.input_ids])).logits[0].float()
            for t in range(1, len(e.labels)):
                if e.labels[t] != IGNORE:
                    total += F.cross_entropy(logits[t - 1 : t], torch.tensor([e.labels[t]])).item()
                    n += 1
    got = perplexity(model, SEQS, pad_token_id=0, batch_size=2)  # padded together in one batch
    assert got["tokens"] == n == 4
    assert abs(got["loss"] - total / n) < tol
    assert abs(got["perplexity"] - math.exp(total / n)) < 3 * tol * math.exp(total / n)


# The same hidden states either way; the head runs on 4 rows instead of all 10, and a product's
# rows may round differently with the number of rows: fp32 to a few units of 2**-24 of a logit,
# bf16 to one step of its 8-bit grid (2**-8 relative, ~0.02 on these logits), so the loss of
# ~6.4 moves by at most that: bounds 1e-5 and 0.03.
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
def test_a_model_without_logits_to_keep_scores_the_same(tiny_llama_dir, dtype, tol):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype)
    wrapped = WithoutLogitsToKeep(model)
    assert accepts_logits_to_keep(model) and not accepts_logits_to_keep(wrapped)
    got, full = perplexity(model, SEQS, 0, 2), perplexity(wrapped, SEQS, 0, 2)
    assert got["tokens"] == full["tokens"] == 4
    assert abs(got["loss"] - full["loss"]) < tol


def test_chat_stream_raises_instead_of_hanging_when_generation_fails(
    tiny_llama_dir, tiny_tokenizer
):
    import pytest

    from lorasft.eval.generate import stream
    from lorasft.model.generation import GenSettings

    class Broken(torch.nn.Module):
        device = torch.device("cpu")

        def generate(self, **kwargs):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        list(stream(Broken(), tiny_tokenizer, [{"role": "user", "content": "hi"}], GenSettings()))


def test_token_batches_bound_rows_and_padded_tokens():
    lengths = [300, 100, 16384, 200, 15457, 100]
    # shortest first; rows x longest <= 1024; the long windows alone
    assert token_batches(lengths, 16, 1024) == [[1, 5, 3], [0], [4], [2]]
    assert token_batches(lengths, 2, 10**6) == [[1, 5], [3, 0], [4, 2]]  # the row cap alone
    assert token_batches(lengths, 16, 8192) == [[1, 5, 3, 0], [4], [2]]
    assert token_batches([], 4, 100) == []
    assert sorted(i for b in token_batches(lengths, 3, 500) for i in b) == list(range(6))


# One row per batch (a bound below two rows' padded size) against both rows padded into one
# batch: the same tokens scored, each row's attention the same up to padding's rounding, bounded
# as in the first test (fp32 1e-4; bf16 0.05: padding changes the attention sums, a few
# hundredths of a loss of ~6.4, far below one token more or less counted).
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_a_token_bound_changes_the_batches_not_the_perplexity(tiny_llama_dir, dtype, tol):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype)
    together, alone = perplexity(model, SEQS, 0, 2), perplexity(model, SEQS, 0, 2, batch_tokens=5)
    assert together["tokens"] == alone["tokens"] == 4
    assert abs(together["loss"] - alone["loss"]) < tol
