import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lorasft.data.tokenize import IGNORE, Encoded
from lorasft.eval.perplexity import perplexity


def test_token_weighted_over_supervised_tokens_only(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    seqs = [
        Encoded([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9]),
        Encoded([10, 11, 12], [IGNORE, 11, IGNORE]),
    ]
    total, n = 0.0, 0
    with torch.no_grad():
        for e in seqs:
            logits = model(torch.tensor([e.input_ids])).logits[0]
            for t in range(1, len(e.labels)):
                if e.labels[t] != IGNORE:
                    total += F.cross_entropy(logits[t - 1 : t], torch.tensor([e.labels[t]])).item()
                    n += 1
    got = perplexity(model, seqs, pad_token_id=0, batch_size=2)  # padded together in one batch
    assert got["tokens"] == n == 4
    assert abs(got["loss"] - total / n) < 1e-4
    assert abs(got["perplexity"] - math.exp(total / n)) < 1e-3


def test_chat_stream_raises_instead_of_hanging_when_generation_fails(
    tiny_llama_dir, tiny_tokenizer
):
    import pytest

    from lorasft.eval.generate import GenSettings, stream

    class Broken(torch.nn.Module):
        device = torch.device("cpu")

        def generate(self, **kwargs):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        list(stream(Broken(), tiny_tokenizer, [{"role": "user", "content": "hi"}], GenSettings()))
