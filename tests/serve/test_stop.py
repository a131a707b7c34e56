"""The server stops where the run learned to stop: at EOS, with finish_reason "stop", fewer
tokens than max_tokens and no end-of-turn text in the answer, streaming or not."""

import pytest

from lorasft.cli import main
from lorasft.serve.app import create_app
from lorasft.serve.engine import load_engine
from tests.conftest import QUICK, tiny_args, write_jsonl
from tests.serve.conftest import LiveServer

ASK = [{"role": "user", "content": "say hi"}]


@pytest.fixture(scope="module")
def stopping_client(tiny_llama_dir, tmp_path_factory):
    """A tiny model overfitted to answer `hi` and stop."""
    from openai import OpenAI

    root = tmp_path_factory.mktemp("stop")
    data = write_jsonl(root / "hi.jsonl", [{"instruction": "say hi", "output": "hi"}] * 8)
    run = root / "run"
    assert main(tiny_args(tiny_llama_dir, run, *QUICK, f"data.train_file={data}",
                          "data.eval_file=null", "data.val_ratio=0", "data.dedup=false",
                          "train.max_steps=60", "train.learning_rate=5e-2",
                          "lora.target_modules=all-linear")) == 0  # fmt: skip
    engine = load_engine(None, [("hi", str(run))])
    with LiveServer(create_app(engine, None, 64, 20_000)) as server:
        yield OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def test_the_answer_ends_at_eos(stopping_client):
    r = stopping_client.chat.completions.create(model="hi", messages=ASK, max_tokens=20,
                                                temperature=0)  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "hi"
    assert 0 < r.usage.completion_tokens < 20


def test_the_streamed_answer_ends_at_eos(stopping_client):
    chunks = list(stopping_client.chat.completions.create(
        model="hi", messages=ASK, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == "hi" and "<|im_end|>" not in text
    assert finishes[-1] == "stop" and 0 < chunks[-1].usage.completion_tokens < 20


def test_ignore_eos_generates_to_the_bound(stopping_client):
    """What load generators send to measure fixed lengths: past EOS, up to max_tokens."""
    r = stopping_client.chat.completions.create(model="hi", messages=ASK, max_tokens=12,
                                                temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith("hi")
