"""Which engine `lorasft serve` runs on: `--engine auto` takes llama.cpp on a CPU where
llama-server is installed and the runs can be put on it, vLLM on a GPU where it is installed,
and otherwise transformers (the reference), saying why."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from lorasft.console import say
from lorasft.model.reopen import read_specs
from lorasft.serve import DEFAULT_MAX_QUEUE
from lorasft.serve.engine import Engine, load_engine


@dataclass
class EngineOptions:
    engine: str = "auto"
    slots: int = 8
    max_queue: int = DEFAULT_MAX_QUEUE
    gguf_type: str = "f16"
    llama_server: str | None = None
    threads: int | None = None


def vllm_installed() -> bool:
    from lorasft.serve.vllm import find_vllm

    return importlib.util.find_spec("vllm") is not None or find_vllm() is not None


def choose_engine(base: str | None, adapters: list[tuple[str, str]], opts: EngineOptions,
                  specs=None) -> str:  # fmt: skip
    if opts.engine != "auto":
        return opts.engine
    if torch.cuda.is_available():
        if vllm_installed():
            return "vllm"
        say("engine: transformers (a GPU without vLLM; pip install vllm to batch requests)")
        return "transformers"
    from lorasft.serve.llamacpp_engine import llamacpp_problem

    problem = llamacpp_problem(base, adapters, opts.llama_server, specs)
    if problem is None:
        return "llama.cpp"
    say(f"engine: transformers, one request at a time (llama.cpp not used: {problem})")
    return "transformers"


def open_engine(base: str | None, adapters: list[tuple[str, str]], dtype: str | None,
                opts: EngineOptions) -> Engine:  # fmt: skip
    specs = read_specs(base, adapters, dtype)  # each run folder read once, here
    kind = choose_engine(base, adapters, opts, specs)
    if kind == "llama.cpp":
        from lorasft.serve.llamacpp_engine import load_llamacpp_engine

        return load_llamacpp_engine(base, adapters, dtype, opts.slots, opts.gguf_type,
                                    opts.llama_server, opts.threads, opts.max_queue, specs)  # fmt: skip
    if kind == "vllm":
        from lorasft.serve.vllm import load_vllm_engine

        return load_vllm_engine(base, adapters, dtype, opts.slots, opts.max_queue, specs=specs)
    return load_engine(base, adapters, dtype, opts.max_queue, specs)
