"""`lorasft serve` fuzzed on the wire (Hypothesis, raw sockets: tests/serve/fuzz_wire.py): every
route and random paths, any method, random headers and keys, wrong content types, JSON bodies
from the request fuzzer whole or cut short, strange and random bytes, bodies over the limit,
slow, chunked, truncated and abandoned deliveries. The property: a complete request gets one of
the documented statuses (200, 400, 401, 404, 405, 413, 503) with an OpenAI-style error body when
it is an error, no key on /v1/* is 401, an oversized body is 413 (or 401 first); an incomplete
one gets no answer or a documented one; and after every request the server answers the same
good request exactly as it did before the fuzzing began.

`bench/fuzz/fuzz.py --targets serve` runs the same property for minutes (LORASFT_FUZZ_MINUTES)."""

from __future__ import annotations

import socket
import time
from urllib.parse import unquote

import httpx
import pytest

from tests.fuzzing import fuzz_target
from tests.serve.conftest import API_KEY
from tests.serve.fuzz_wire import Wire, send, wires
from tests.serve.test_fuzz_http import bodies

ROUTES = ["/health", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/{}", "/{}"]
KEY = f"Bearer {API_KEY}"
DOCUMENTED = {200, 400, 401, 404, 405, 413, 503}
GOOD = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "temperature": 0}  # fmt: skip


def good_answer(url: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", json=GOOD, headers={"Authorization": KEY},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def check_answer(wire: Wire, status: int | None, answer) -> None:
    if not wire.complete():
        assert status is None or status in DOCUMENTED, (wire, status)
        return
    assert status in DOCUMENTED, (wire, status, answer.body[:300])
    path = unquote(wire.target.split("?")[0])
    if path.startswith("/v1/") and dict(wire.headers).get("Authorization") != KEY:
        assert status == 401, (wire, status)
    if len(wire.body) > 20_000:
        assert status in (401, 413), (wire, status)
    if status >= 400 and wire.method != "HEAD":
        err = answer.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], answer.body
    elif status == 200 and wire.method == "POST" and path.endswith("completions"):
        if answer.headers["content-type"].startswith("text/event-stream"):
            assert answer.body.rstrip().endswith(b"data: [DONE]"), answer.body[-300:]
        else:
            assert answer.json()["choices"], answer.body[:300]


@pytest.fixture(scope="module")
def reference(live) -> str:
    return good_answer(live.url)


def test_no_request_on_the_wire_breaks_the_server(live, reference):
    def prop(wire: Wire) -> None:
        answer = send(live.server.config.port, wire)
        check_answer(wire, answer.status, answer)
        assert good_answer(live.url) == reference  # the server is up and unchanged

    fuzz_target("serve", wires(ROUTES, ["", KEY, KEY, KEY, "Bearer nope", "bearer " + API_KEY],
                               bodies().map(lambda rb: rb[1])), prop, examples=150)  # fmt: skip


def test_slow_and_stuck_clients_do_not_block_others(live, reference):
    """Slowloris: 30 connections stuck halfway through their headers or their body; the good
    request is answered as before, at once, while they hang and after they go away."""
    port, stuck = live.server.config.port, []
    body = b'{"model": "a", "prompt": "hi", "max_tokens": 2}'
    halves = [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthor",
              b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: " + KEY.encode()
              + b"\r\nContent-Length: 999\r\n\r\n" + body[:20]]  # fmt: skip
    try:
        for i in range(30):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(halves[i % 2])
            stuck.append(s)
        start = time.monotonic()
        assert good_answer(live.url) == reference
        assert time.monotonic() - start < 10
    finally:
        for s in stuck:
            s.close()
    assert good_answer(live.url) == reference


REGRESSIONS = [
    # was a 500: JSON's escape for a lone surrogate reached the tokenizer
    (Wire("POST", "/v1/completions", (("Authorization", KEY), ("Content-Type", "application/json")),
          b'{"model": "a", "prompt": "\\ud800", "max_tokens": 2}'), 400, "prompt: a lone"),
    (Wire("POST", "/v1/chat/completions", (("Authorization", KEY), ("Content-Type", "application/json")),
          b'{"model": "a", "messages": [{"role": "user", "content": "a\\udfff"}]}'), 400,
     "messages.0.content: a lone"),
    (Wire("POST", "/v1/chat/completions", (("Authorization", KEY),), b"[" * 50_000), 413, None),
    (Wire("POST", "/v1/chat/completions", (("Authorization", KEY), ("Content-Type", "application/json")),
          b"[" * 19_000), 400, "error parsing the body"),
]  # fmt: skip


@pytest.mark.parametrize("wire,status,message", REGRESSIONS,
                         ids=["surrogate-prompt", "surrogate-message", "deep-nesting-over-limit",
                              "deep-nesting"])  # fmt: skip
def test_regressions(live, reference, wire, status, message):
    answer = send(live.server.config.port, wire)
    check_answer(wire, answer.status, answer)
    assert answer.status == status, answer.body
    assert message is None or message in answer.json()["error"]["message"], answer.body
    assert good_answer(live.url) == reference
