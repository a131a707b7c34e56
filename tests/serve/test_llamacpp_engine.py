"""`lorasft serve --engine llama.cpp`: llama-server (built by `make llama-server`) behind lorasft's
front. Two adapters of one base, each a GGUF LoRA chosen per request, answer as their runs (in
fp32 and in bf16); the engine's slots are freed when clients leave; past the queue the answer is
503 with Retry-After; a soak of mixed clients leaves the server correct and idle; the engine
process never outlives lorasft."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from lorasft.cli import main
from lorasft.serve.llamacpp_engine import find_llama_server
from tests.conftest import PRECISIONS, QUICK, tiny_args
from tests.serve.conftest import API_KEY, LiveServer, free_port

if find_llama_server() is None:
    message = "llama-server not installed: `make llama-server` builds it into the venv"
    if os.environ.get("LORASFT_REQUIRE_LLAMA_SERVER"):  # set by `make test`: never skipped there
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)

ALL_LINEAR = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """GGUF files of the tiny models go to a cache of this module's own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module", params=PRECISIONS)
def two_runs(request, tiny_llama_dir, tmp_path_factory):
    """Two adapters of one base (every linear layer, so q/k/v and the MLP are all in the GGUF
    LoRA), trained apart enough to answer differently."""
    root = tmp_path_factory.mktemp(f"lc-{request.param}")
    a, b = root / "a", root / "b"
    common = [*QUICK, ALL_LINEAR, f"train.precision={request.param}"]
    assert main(tiny_args(tiny_llama_dir, a, *common, "train.max_steps=3",
                          "train.learning_rate=0.05")) == 0  # fmt: skip
    assert main(tiny_args(tiny_llama_dir, b, *common, "train.max_steps=4",
                          "train.learning_rate=0.02", "train.seed=7")) == 0  # fmt: skip
    return a, b


def _app(engine, **kw):
    from lorasft.serve.app import create_app

    return create_app(engine, api_key=API_KEY, **kw)


@pytest.fixture(scope="module")
def lc_live(two_runs):
    from lorasft.serve.llamacpp_engine import load_llamacpp_engine

    a, b = two_runs
    engine = load_llamacpp_engine(None, [("a", str(a)), ("b", str(b))], slots=2, qtype="f32")
    with LiveServer(_app(engine, max_tokens_cap=64)) as server:
        server.engine = engine
        yield server
    assert not engine.server.alive()  # stopped with the server


# --- The GGUF LoRA file --------------------------------------------------------------------


def test_the_gguf_lora_holds_the_adapter(two_runs, tmp_path):
    """Alpha as llama.cpp reads it, A as PEFT's, B with llama.cpp's rotary row order for q/k."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from lorasft.export.gguf import permute
    from lorasft.export.gguf_lora import write_lora_gguf

    run = two_runs[0]
    cfg = json.loads((run / "adapter_config.json").read_text())
    config = AutoConfig.from_pretrained(
        json.loads((run / "lorasft_run.json").read_text())["base_path"]
    )
    out = write_lora_gguf(run, config, tmp_path / "a.gguf")
    reader = gguf.GGUFReader(out)
    alpha = reader.fields["adapter.lora.alpha"]
    assert float(alpha.parts[alpha.data[0]][0]) == cfg["lora_alpha"]
    tensors = {
        t.name: np.array(t.data).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors
    }
    peft = load_file(run / "adapter_model.safetensors")
    assert len(tensors) == len(peft) == 2 * 7 * config.num_hidden_layers
    prefix = "base_model.model.model.layers.1.self_attn"
    k_b = peft[f"{prefix}.k_proj.lora_B.weight"].numpy()
    assert np.array_equal(tensors["blk.1.attn_k.weight.lora_b"],
                          permute(k_b, config.num_attention_heads, config.num_key_value_heads))  # fmt: skip
    assert not np.array_equal(tensors["blk.1.attn_k.weight.lora_b"], k_b)  # the order did change
    assert np.array_equal(tensors["blk.1.attn_q.weight.lora_a"],
                          peft[f"{prefix}.q_proj.lora_A.weight"].numpy())  # fmt: skip


@pytest.mark.parametrize("change, named", [
    ({"modules_to_save": ["embed_tokens", "norm"]}, "modules_to_save"),
    ({"use_dora": True}, "DoRA"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"bias": "lora_only"}, "bias"),
])  # fmt: skip
def test_what_a_gguf_lora_cannot_hold_is_refused_by_name(two_runs, tmp_path, change, named):
    import shutil

    from lorasft.export.gguf_lora import check_lora
    from lorasft.model.load import ModelError

    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    cfg = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ModelError, match=named) as e:
        check_lora(run)
    assert "--engine transformers" in str(e.value)


def test_rslora_alpha_gives_peft_scale():
    from lorasft.export.gguf_lora import gguf_alpha

    # llama.cpp scales by alpha / r; PEFT's rsLoRA by alpha / sqrt(r)
    assert gguf_alpha({"lora_alpha": 16, "r": 16, "use_rslora": True}) / 16 == pytest.approx(16 / 4)
    assert gguf_alpha({"lora_alpha": 16, "r": 8}) / 8 == 2.0


# --- Answers -------------------------------------------------------------------------------


def _verify(run, live, served_as: str, capsys) -> tuple[int, str]:
    rc = main(["verify", str(run), "--url", live.url, "--api-key", API_KEY, "--server-model",
               served_as, "--num-prompts", "6", "--max-new-tokens", "12"])  # fmt: skip
    return rc, capsys.readouterr().out


@pytest.fixture(scope="module")
def q6_live(two_runs):
    """Run a on a base that llama-quantize made (`serve --gguf-type q6_k`)."""
    from lorasft.serve.llamacpp_engine import load_llamacpp_engine

    engine = load_llamacpp_engine(None, [("a", str(two_runs[0]))], slots=1, qtype="q6_k")
    with LiveServer(_app(engine, max_tokens_cap=64)) as server:
        yield server


def test_a_quantized_base_is_served_and_verify_bounds_it_by_its_type(q6_live, two_runs, capsys):
    """/health names the base's type, and `verify --url` judges the served answers with that
    type's bound (a share of the run's largest logit), passing the run it serves."""
    assert httpx.get(f"{q6_live.url}/health").json()["weights"] == "Q6_K"
    capsys.readouterr()
    rc, out = _verify(two_runs[0], q6_live, "a", capsys)
    assert rc == 0, out
    assert "weights Q6_K (a near tie is a margin within 8% of the run's largest logit" in out


def test_each_adapter_answers_as_its_run(lc_live, two_runs, capsys):
    """`verify --url` on each run: every answer equal, or different only where the run's own top
    two logits are closer than the serving engine's rounding (a near tie, shown with margins)."""
    for run, name in zip(two_runs, "ab"):
        rc, out = _verify(run, lc_live, name, capsys)
        assert rc == 0, out
        rows = [line.split() for line in out.splitlines() if " server " in line]
        assert len(rows) == 6
        exact = sum(r[3] == "same" for r in rows)
        assert exact >= 4, out  # near ties are the exception, not the rule


def test_the_adapter_chosen_per_request_matters(lc_live, two_runs, capsys):
    rc, out = _verify(two_runs[1], lc_live, "a", capsys)  # run b against adapter a
    assert rc == 1 and "MISMATCH" in out


def test_stream_and_whole_answers_are_the_same_text(lc_live):
    from openai import OpenAI

    client = OpenAI(base_url=f"{lc_live.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    for model in lc_live.engine.served:  # the base and both adapters
        for text in ("法国的首都是哪里？", "Who lives in Paris?"):
            msgs = [{"role": "user", "content": text}]
            whole = client.chat.completions.create(model=model, messages=msgs, max_tokens=16,
                                                   temperature=0)  # fmt: skip
            parts = client.chat.completions.create(model=model, messages=msgs, max_tokens=16,
                                                   temperature=0, stream=True)  # fmt: skip
            streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
            assert streamed == whole.choices[0].message.content
            assert whole.usage.completion_tokens <= 16


# --- Slots, queue, soak, process -----------------------------------------------------------


@pytest.fixture(scope="module")
def long_base(tiny_llama_dir, tmp_path_factory):
    """The tiny base with a 4096-token window: generations long enough to leave in the middle."""
    import shutil

    out = tmp_path_factory.mktemp("long") / "base"
    shutil.copytree(tiny_llama_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4096}))
    return out


@pytest.fixture
def one_slot(long_base):
    """One slot and one place in the queue; llama-server on one thread. What the reactions timed
    here depend on: lorasft's event loop getting CPU time between the streams it relays. It
    once decoded each stream's whole answer at every token, which under a 2-thread training job
    beside the suite delayed the 503 by up to 9.7 s; decoding a window per token (TextCutter),
    the same load left it at 0.6 s or less (2-core AVX2 EPYC, 2026-12-06)."""
    from lorasft.serve.llamacpp_engine import load_llamacpp_engine

    engine = load_llamacpp_engine(str(long_base), [], slots=1, max_queue=1, threads=1)
    with LiveServer(_app(engine, max_tokens_cap=4000)) as server:
        server.engine = engine
        yield server


def _body(n: int, stream: bool, text: str = "tell me a long story") -> dict:
    return {"model": "base", "messages": [{"role": "user", "content": text}], "max_tokens": n,
            "temperature": 0, "stream": stream}  # fmt: skip


HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _engine_auth(engine) -> dict:
    return {"Authorization": f"Bearer {engine.server.key}"}


def _engine_slots(engine) -> list[dict]:
    r = httpx.get(f"{engine.server.url}/slots", headers=_engine_auth(engine))
    r.raise_for_status()
    return r.json()


def _wait_idle(engine, seconds: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        slots = _engine_slots(engine)
        if engine.in_flight == 0 and not any(s["is_processing"] for s in slots):
            return slots
        time.sleep(0.05)
    raise AssertionError(f"not idle after {seconds} s: {engine.in_flight} in flight, {slots}")


def _predicted_total(engine) -> int:
    """Tokens llama-server has generated so far (its Prometheus counter; a slot's count is
    added when the slot is next used)."""
    r = httpx.get(f"{engine.server.url}/metrics", headers=_engine_auth(engine))
    line = next(x for x in r.text.splitlines() if x.startswith("llamacpp:tokens_predicted_total"))
    return int(float(line.split()[-1]))


@pytest.mark.timing  # a busy CPU beside it delays the server's reaction
def test_a_client_leaving_mid_stream_frees_its_slot(one_slot):
    """'hello' runs the tiny base to the full 4000 tokens (a few seconds) when nobody leaves."""
    engine = one_slot.engine
    with httpx.Client(base_url=one_slot.url, headers=HEADERS, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=_body(4000, True, "hello")) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            chunks = [next(lines) for _ in range(6)]  # a few tokens in, then the client leaves
            assert any('"content"' in c for c in chunks)
        _wait_idle(engine)
        r = http.post("/v1/chat/completions", json=_body(8, False))  # the slot serves again
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        left_at = _predicted_total(engine) - 8
        assert 0 < left_at < 2000  # stopped soon after the client left, not run to the end
        full = http.post("/v1/chat/completions", json=_body(4000, False, "hello")).json()
        assert full["usage"]["completion_tokens"] == 4000  # what staying would have cost


@pytest.mark.timing  # a busy CPU beside it delays the server's reaction
def test_past_the_queue_the_answer_is_503_with_retry_after(one_slot):
    engine = one_slot.engine
    with httpx.Client(base_url=one_slot.url, headers=HEADERS, timeout=30) as http:
        long = _body(4000, True, "hello")  # seconds of generating, longer while unread
        with http.stream("POST", "/v1/chat/completions", json=long) as first:
            held = first.iter_lines()  # kept: dropping the iterator closes the connection
            next(held)  # generating: the slot is taken
            with http.stream("POST", "/v1/chat/completions", json=long) as second:
                assert second.status_code == 200  # admitted: waits in the one queue place
                t0 = time.monotonic()
                third = http.post("/v1/chat/completions", json=_body(8, False))
                assert time.monotonic() - t0 < 2.0  # refused at once, never left hanging
                assert third.status_code == 503
                assert third.headers["Retry-After"] == "1"
                assert third.json()["error"]["code"] == "server_busy"
                assert engine.in_flight == 2
        _wait_idle(engine)
        assert http.post("/v1/chat/completions", json=_body(8, False)).status_code == 200


@pytest.mark.timing  # how many of 8 s of requests are served depends on the CPU left to it:
# 10 answers is a small share of what one core serves (passed with a 2-thread job beside it)
def test_soak_mixed_clients_leave_the_server_correct_and_idle(long_base):
    """Bounded (8 s, loopback): streaming and plain clients, clients that leave mid-stream and
    clients that send bad bodies, on 2 slots and 2 queue places. Every request is answered
    (200, a 4xx for the bad ones, or 503 + Retry-After when full; no other status, no hang);
    afterwards the engine is idle and greedy answers are what they were before."""
    from lorasft.serve.llamacpp_engine import load_llamacpp_engine

    engine = load_llamacpp_engine(str(long_base), [], slots=2, max_queue=2)
    prompts = ["Who lives in Paris?", "法国的首都", "hello there"]
    app = _app(engine, max_tokens_cap=512, max_request_bytes=4000)
    with (
        LiveServer(app) as live,
        httpx.Client(base_url=live.url, headers=HEADERS, timeout=30) as http,
    ):

        def answer(text):
            r = http.post("/v1/chat/completions", json=_body(24, False, text))
            assert r.status_code == 200
            return r.json()["choices"][0]["message"]["content"]

        before = [answer(p) for p in prompts]
        statuses, problems = [], []
        stop_at = time.monotonic() + 8

        def worker(kind: int):
            with httpx.Client(base_url=live.url, headers=HEADERS, timeout=30) as c:
                i = 0
                while time.monotonic() < stop_at:
                    i += 1
                    try:
                        statuses.append(_soak_request(c, kind, i, prompts))
                    except Exception as e:  # noqa: BLE001 (collected, then asserted empty)
                        problems.append(f"client {kind}: {e!r}")

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not problems, problems[:3]
        _wait_idle(engine)
        assert [answer(p) for p in prompts] == before
        assert {s for s, _ in statuses} <= {200, 400, 401, 404, 413, 503}
        assert sum(s == 200 for s, _ in statuses) >= 10
        assert all(retry == "1" for s, retry in statuses if s == 503)
        assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
    assert not engine.server.alive()


def _soak_request(c: httpx.Client, kind: int, i: int, prompts: list[str]) -> tuple[int, str | None]:
    text = prompts[(kind + i) % len(prompts)]
    if kind in (0, 1):  # streams read to the end
        with c.stream("POST", "/v1/chat/completions", json=_body(40, True, text)) as r:
            body = "".join(r.iter_lines()) if r.status_code == 200 else r.read().decode()
            if r.status_code == 200:
                assert body.endswith("data: [DONE]")
            return r.status_code, r.headers.get("Retry-After")
    if kind in (2, 3):  # plain answers
        r = c.post("/v1/chat/completions", json=_body(24, False, text))
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] <= 24
        return r.status_code, r.headers.get("Retry-After")
    if kind in (4, 5):  # leave mid-stream
        with c.stream("POST", "/v1/chat/completions", json=_body(400, True, text)) as r:
            if r.status_code == 200:
                lines = r.iter_lines()
                for _ in range(1 + i % 4):
                    next(lines)
            return r.status_code, r.headers.get("Retry-After")
    bad = [  # kind 6, 7: bad bodies
        lambda: c.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
        lambda: c.post("/v1/chat/completions", json={**_body(8, False), "model": "nope"}),
        lambda: c.post("/v1/chat/completions", json={"model": "base", "messages": []}),
        lambda: c.post("/v1/chat/completions", json=_body(8, False, "x" * 5000)),
        lambda: c.post("/v1/chat/completions", json=_body(8, False), headers={"Authorization": "Bearer no"}),
    ]  # fmt: skip
    r = bad[i % len(bad)]()
    assert r.status_code in (400, 401, 404, 413), r.text
    assert "error" in r.json()
    return r.status_code, None


# --- The engine process never outlives lorasft ---------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pid: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, waiting for its (dead) parent's reaper
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_no_engine_process_outlives_lorasft_serve(long_base, sig):
    port = free_port()
    cmd = [sys.executable, "-m", "lorasft", "serve", "--engine", "llama.cpp", "--base",
           str(long_base), "--port", str(port), "--slots", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "lorasft serve did not start"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert health.json()["engine"] == "llama.cpp"
        engines = [p for p in _children(proc.pid)
                   if Path(f"/proc/{p}/exe").resolve().name == "llama-server"]  # fmt: skip
        assert len(engines) == 1
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert _gone(engines[0]), f"llama-server {engines[0]} outlived lorasft serve ({sig.name})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_auto_takes_llama_cpp_here_and_says_why_not_otherwise(two_runs, tmp_path, capsys):
    import shutil

    from lorasft.serve.engine_choice import EngineOptions, choose_engine

    assert not torch.cuda.is_available()
    runs = [("a", str(two_runs[0]))]
    assert choose_engine(None, runs, EngineOptions()) == "llama.cpp"
    odd = tmp_path / "odd"
    shutil.copytree(two_runs[0], odd)
    cfg = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    capsys.readouterr()
    assert choose_engine(None, [("odd", str(odd))], EngineOptions()) == "transformers"
    said = capsys.readouterr().err
    assert "llama.cpp not used" in said and "DoRA" in said


# --- Log-probabilities ---------------------------------------------------------------------


def test_logprobs_are_llama_cpp_s_and_the_run_s(lc_live, two_runs):
    """llama-server's log-probabilities of a greedy answer equal the run's own (opened in fp32,
    the GGUF's type: both sides f32, summed in other orders, so agreement to ~1e-5 on this tiny
    model; 1e-3 leaves room, an adapter or position mix-up moves them by >0.1), and the echo
    scorer (llama.cpp's binding on the same GGUF files) gives llama-server's numbers."""
    import asyncio

    from lorasft.model.reopen import open_run
    from lorasft.serve.engine import Params

    engine = lc_live.engine
    for run, name in zip(two_runs, "ab"):
        served = engine.served[name]
        prompt = engine.encode_chat(served, [{"role": "user", "content": "Who lives in Paris?"}])
        job = engine.submit(served, prompt, Params(max_tokens=6, temperature=0.0, logprobs=3))
        job.text()
        scores = job.take_scores()
        assert len(scores) == job.completion_tokens
        ids = prompt + [s.token for s in scores]
        model = open_run(run, dtype="float32").model
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        for i, s in enumerate(scores):
            at = ref[len(prompt) + i - 1]
            assert s.logprob == pytest.approx(at[s.token].item(), abs=1e-3)
            assert [lp for _, lp in s.top] == pytest.approx(at.topk(3).values.tolist(), abs=1e-3)
        echo = asyncio.run(engine.prompt_scores(served, ids, 3))
        assert echo[0].logprob is None and len(echo) == len(ids)
        for i, s in enumerate(scores):
            assert echo[len(prompt) + i].logprob == pytest.approx(s.logprob, abs=1e-4)


def test_completion_echo_with_logprobs_on_llama_cpp(lc_live):
    from openai import OpenAI

    client = OpenAI(base_url=f"{lc_live.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    ids = lc_live.engine.encode_text(lc_live.engine.served["b"], "The cat sat on the mat")
    r = client.completions.create(model="b", prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                  temperature=0)  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2, stream=True)  # fmt: skip
    entries = [e for c in chat if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]  # fmt: skip
    assert len(entries) == 4 and all(len(e.top_logprobs) == 2 for e in entries)


# --- JSON answers --------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
          "required": ["city"], "additionalProperties": False}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_constrains_the_answer_to_json(lc_live, stream):
    """The tiny model's free answer is not JSON; through llama.cpp's grammar it parses, and
    follows the schema when one is given."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{lc_live.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Where is the Louvre?"}]

    def answer(**kw) -> str:
        r = client.chat.completions.create(model="a", messages=msgs, max_tokens=60,
                                           temperature=0, stream=stream, **kw)  # fmt: skip
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content

    with pytest.raises(json.JSONDecodeError):
        json.loads(answer())
    assert isinstance(json.loads(answer(response_format={"type": "json_object"})), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}
    assert json.loads(answer(response_format=fmt))["city"] in ("Paris", "Rome")


def test_serve_reads_each_run_folder_once(two_runs, tmp_path, monkeypatch):
    """`--engine auto` decides and then loads from one read of the run folders (it read them
    twice: once to check llama.cpp could serve them, once to load)."""
    import shutil

    from lorasft.model import reopen
    from lorasft.serve.engine_choice import EngineOptions, open_engine

    odd = tmp_path / "odd"  # a DoRA adapter: llama.cpp says no, transformers serves it
    shutil.copytree(two_runs[0], odd)
    cfg = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    reads, real = [], reopen.read_run
    monkeypatch.setattr(
        reopen, "read_run", lambda d, *a, **k: reads.append(str(d)) or real(d, *a, **k)
    )
    engine = open_engine(None, [("odd", str(odd))], None, EngineOptions())
    try:
        assert engine.name == "transformers" and reads == [str(odd)]
    finally:
        engine.close()
