"""The server's request bodies, fuzzed (Hypothesis): valid chat and completion requests with
fields replaced or added at random (every field the API knows, wrong types, huge and negative
numbers, nesting, control characters, token-id prompts out of range, bodies that are not
objects). The property: every answer is a 2xx with the API's shape or a 4xx with an OpenAI-style
error body naming the field when there is one; never a 5xx, never a hang."""

from __future__ import annotations

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.serve.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "stop", "seed", "stream", "stream_options", "n", "ignore_eos", "logprobs",
          "top_logprobs", "echo", "suffix", "response_format", "tools", "tool_choice",
          "functions", "logit_bias", "presence_penalty", "frequency_penalty", "best_of", "user"]  # fmt: skip
BUDGET = settings(max_examples=300, deadline=None, derandomize=True, database=None)

text = st.text(max_size=30) | st.sampled_from(["", "a", "<|im_end|>", "\x00", "答案", "a" * 3000])
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
           | st.floats(allow_nan=False, allow_infinity=False) | text)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(text, inner, max_size=3), max_leaves=8)  # fmt: skip
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant",
                                                                    "tool", ""]) | values,
                                           "content": text | values}), max_size=3)  # fmt: skip
special = {
    "model": st.sampled_from(["a", "b", "nope", ""]) | values,
    "messages": messages | values,
    "prompt": text | st.lists(st.integers(-5, 10**6), max_size=5) | values,
    "max_tokens": st.integers(-2, 100) | values,
    "max_completion_tokens": st.integers(-2, 100) | values,
    "logprobs": st.booleans() | st.integers(-1, 25) | values,
    "top_logprobs": st.integers(-1, 25) | values,
    "response_format": st.sampled_from(
        [
            {"type": "text"},
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"schema": {}}},
        ]
    )
    | values,
    "stream": st.booleans() | values,
}


@st.composite
def bodies(draw):
    route = draw(st.sampled_from(["chat/completions", "completions"]))
    body = {"model": "a", "max_tokens": 3, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if route.startswith("chat")
                else {"prompt": "hi"})  # fmt: skip
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        body[name] = draw(special.get(name, values))
    if draw(st.integers(0, 19)) == 0:
        return route, draw(values)  # not an object at all
    return route, body


def check(live, route: str, body) -> None:
    r = httpx.post(f"{live.url}/v1/{route}", json=body, headers=AUTH, timeout=60)
    assert r.status_code < 500, (body, r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [x for x in r.text.split("\n\n") if x]
        assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
        assert not any('"error"' in e for e in events[:-1]), r.text[:500]
    else:
        assert r.json()["choices"], r.text


@BUDGET
@given(bodies())
def test_no_request_body_gets_a_5xx(live, case):
    route, body = case
    check(live, route, body)


REGRESSIONS = [
    ("completions", {"model": "a", "prompt": ""}),  # was a 500: no ids to generate from
    ("completions", {"model": "a", "prompt": [[]]}),
    ("completions", {"model": "a", "prompt": [1, -1]}),
    ("chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}],
                          "top_logprobs": 3}),
    # was a 500 (2026-12-06): logits / 3.7e-297 overflow and the sampler's probabilities are NaN
    ("chat/completions", {"model": "a", "max_tokens": 3, "temperature": 3.680320102172283e-297,
                          "messages": [{"role": "user", "content": "hi"}]}),
]  # fmt: skip


def test_a_tiny_temperature_answers_as_greedy(live):
    """Below GREEDY_BELOW a temperature is greedy: the same answer as temperature 0."""
    answers = []
    for t in (0.0, 1e-300, 9e-7):
        body = {"model": "a", "max_tokens": 6, "temperature": t,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        r = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
    assert answers[1] == answers[0] == answers[2]


def test_regressions(live):
    """Bodies the fuzzer found (or that sit next to them), kept."""
    for route, body in REGRESSIONS:
        check(live, route, body)
