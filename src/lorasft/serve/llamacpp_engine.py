"""llama.cpp's `llama-server` as the engine behind `lorasft serve` (the default on a CPU where it
is installed): continuous batching over `--parallel` slots, every adapter loaded next to the base
as a GGUF LoRA and switched on per request through the request's `lora` field.

lorasft exports the base (as the runs trained it: dtype widened to float, context extension in
the GGUF's RoPE keys) once into its cache, and each adapter as a GGUF LoRA; then it starts
llama-server on a free loopback port with a random key of its own (no one else on the machine
can use the engine around lorasft's key, bounds and checks), waits for its health check, and
stops it with the server. On Linux the engine also dies with the lorasft process if that is
killed outright (PR_SET_PDEATHSIG), so no engine is ever left behind.

Requests go to llama-server's native `/completion` as token ids rendered by the run's own
template (`Engine.encode_chat`), greedy or with the client's temperature and top_p and every other
llama.cpp sampler switched off, and come back as token ids that lorasft decodes with the run's
tokenizer and cuts at stop strings: the same path as the transformers engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import torch

from lorasft.console import say
from lorasft.export import GGUF_TYPES
from lorasft.export.gguf import check_llama, source_pre_type, write_gguf
from lorasft.export.gguf_lora import ADAPTER_CONFIG, ADAPTER_FILE, check_lora, write_lora_gguf
from lorasft.model.context import plan_context, rope_parameters
from lorasft.model.load import ModelError, cache_root, read_config, weights_stamp
from lorasft.model.reopen import RunSpec, open_base, read_specs, served_context
from lorasft.run_files import replaced
from lorasft.serve import DEFAULT_MAX_QUEUE
from lorasft.serve.engine import Generation, Params, served_names
from lorasft.serve.logprobs import TokenScore, prompt_scores_from_logits
from lorasft.serve.process import EngineProcess, RemoteEngine, RemoteGeneration
from lorasft.serve.schemas import APIError
from lorasft.serve.textstream import REPLACEMENT, byte_token_ids, bytes_as_tokens

BINARY_ENV = "LORASFT_LLAMA_SERVER"
GGUF_FORMAT = 1  # bump when what base_gguf / lora_gguf write changes, so cached files are rewritten
# Every llama.cpp sampler but top-p and temperature switched off, as transformers samples
# (serve's Params: top_k=0); temperature 0 is llama.cpp's greedy argmax.
NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0,
                    "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0,
                    "xtc_probability": 0.0, "top_n_sigma": -1.0, "mirostat": 0}  # fmt: skip


def find_llama_server(explicit: str | None = None) -> Path | None:
    """`--llama-server PATH`, else $LORASFT_LLAMA_SERVER, else the one `make llama-server` put
    next to this Python, else `llama-server` on PATH."""
    if explicit:
        p = Path(explicit).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise ModelError(f"--llama-server {p}: not an executable file")
        return p
    for candidate in (os.environ.get(BINARY_ENV), Path(sys.executable).parent / "llama-server",
                      shutil.which("llama-server")):  # fmt: skip
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def base_gguf(spec: RunSpec, runs: list[RunSpec], qtype: str) -> Path:
    """The base as the runs trained it, in GGUF, cached by its weights, dtype, context and type."""
    context = served_context(runs)
    ctx_json = context.model_dump_json() if context is not None else "none"
    stamp = json.dumps(weights_stamp(spec.base_path))
    key = _digest(str(spec.base_path.resolve()).encode(), stamp.encode(),
                  str(spec.dtype).encode(), ctx_json.encode(), qtype.encode(),
                  spec.quantization.encode(),
                  str(GGUF_FORMAT).encode())  # fmt: skip
    out = cache_root() / "serve" / f"{spec.name}-{key}-{qtype}.gguf"
    if out.is_file():
        return out
    say(f"writing the base as GGUF for llama.cpp (once, cached): {out}")
    model = open_base(spec, context, dequantize=True).float()
    check_llama(model.config)
    with replaced(out) as tmp:
        write_gguf(model, spec.tok, tmp, qtype, name=spec.name, pre=source_pre_type(spec.base_path))
    return out


def lora_gguf(run: RunSpec, config) -> Path:
    """The run's adapter as a GGUF LoRA, cached by the adapter's bytes."""
    check_lora(run.dir)
    key = _digest((run.dir / ADAPTER_FILE).read_bytes(), (run.dir / ADAPTER_CONFIG).read_bytes(),
                  str(GGUF_FORMAT).encode())  # fmt: skip
    out = cache_root() / "serve" / f"lora-{key}.gguf"
    if not out.is_file():
        with replaced(out) as tmp:
            write_lora_gguf(run.dir, config, tmp)
    return out


def gguf_window(path: Path) -> int:
    import gguf

    field_ = gguf.GGUFReader(path).fields["llama.context_length"]
    return int(field_.parts[field_.data[0]][0])


@dataclass
class LlamaServer(EngineProcess):
    """llama-server on loopback with the base GGUF and every adapter's GGUF LoRA."""

    model: Path | None = None
    loras: list[Path] = field(default_factory=list)
    ctx_per_slot: int = 2048
    threads: int | None = None
    label: str = "llama-server"

    def command(self) -> list[str]:
        cmd = [str(self.binary), "--model", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), "--parallel", str(self.slots),
               "--ctx-size", str(self.slots * self.ctx_per_slot), "--no-webui",
               # No host-memory prompt cache: it restores a prompt's KV state whatever adapter
               # computed it (llama.cpp keys it by tokens alone), so one adapter's request would
               # continue from another's. Each slot's own reuse is kept (reset on an adapter
               # change).
               "--cache-ram", "0", "--metrics"]  # fmt: skip
        for lora in self.loras:
            cmd += ["--lora", str(lora)]
        if self.loras:
            cmd.append("--lora-init-without-apply")  # every request names its adapter
        if self.threads:
            cmd += ["--threads", str(self.threads), "--threads-batch", str(self.threads)]
        return cmd

    def env(self) -> dict[str, str]:
        return {"LLAMA_API_KEY": self.key}  # not on the command line (ps shows it)


@dataclass
class LlamaGeneration(RemoteGeneration):
    """One request on llama-server. A whole answer comes back as every generated id. A stream
    comes token by token, except that llama-server holds back a token that ends inside a UTF-8
    character and sends it later as text only, next to the token that completes the character:
    those bytes are fed on as single-byte tokens, which decode to exactly the same text."""

    async def _tokens(self) -> AsyncIterator[int]:
        server: LlamaServer = self.engine.server
        body = {**self.body, "stream": not self.whole}
        # aclosing: when the client leaves, the request to llama-server is closed at once (its
        # slot stops), not when the abandoned generator is collected.
        try:
            async with aclosing(_post(self.engine, body)) as messages:
                async for msg in messages:
                    self._keep_scores(msg)
                    if self.whole:
                        for token in msg.get("tokens") or []:
                            yield token
                    else:
                        for token in self._streamed(msg):
                            yield token
                    if msg.get("stop"):
                        self.ended_at_stop = msg.get("stop_type") in ("eos", "word")
                        self.engine_count = msg.get("tokens_predicted", self.engine_count)
                        return
        except httpx.TransportError as e:
            alive = "" if server.alive() else f" (it exited: {server.log_tail(4)})"
            raise self.engine.error(f"cannot reach llama-server: {e!r}{alive}") from e

    def _keep_scores(self, msg: dict) -> None:
        """llama-server's `completion_probabilities` (asked for with `n_probs`): the model's
        log-probabilities before sampling, as lorasft reports them."""
        k = self.params.logprobs
        if k is None:
            return
        for p in msg.get("completion_probabilities") or []:
            top = [(t["id"], t["logprob"]) for t in p.get("top_logprobs", [])[:k]]
            self.scores.append(TokenScore(p["id"], p["logprob"], top))

    def _streamed(self, msg: dict) -> list[int]:
        tokens, count = msg.get("tokens") or [], msg.get("tokens_predicted")
        held = count is not None and count - (self.engine_count or 0) > len(tokens)
        if count is not None:
            self.engine_count = count
        if not held:
            return tokens
        by_byte, content = self.engine.byte_ids[self.served.name], msg.get("content", "")
        if not content:  # it ended inside a character whose bytes were never sent: one U+FFFD,
            content = REPLACEMENT  # as decoding those ids gives
        return bytes_as_tokens(by_byte, content.encode("utf-8"))


async def _post(engine: LlamaCppEngine, body: dict) -> AsyncIterator[dict]:
    """llama-server's `/completion` answer: each server-sent event, or the one JSON body. A kept
    connection that the engine closed while idle is retried once on a new one."""
    server, http = engine.server, engine.http()
    headers = server.auth()
    for attempt in (1, 2):
        started = False
        try:
            async with http.stream("POST", f"{server.url}/completion", json=body,
                                   headers=headers) as r:  # fmt: skip
                started = True
                if r.status_code != 200:
                    detail = (await r.aread()).decode(errors="replace")[:300]
                    raise engine.error(f"HTTP {r.status_code}: {detail}")
                if not body["stream"]:
                    yield json.loads(await r.aread())
                    return
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        msg = json.loads(line[6:])
                        if "error" in msg:
                            raise engine.error(str(msg["error"])[:300])
                        yield msg
                return
        except httpx.RemoteProtocolError:
            if started or attempt == 2:
                raise


class LlamaCppEngine(RemoteEngine):
    name = "llama.cpp"

    def __init__(self, served, context_window: int, server: LlamaServer, qtype: str,
                 max_queue: int = DEFAULT_MAX_QUEUE):  # fmt: skip
        super().__init__(served, context_window, server, max_queue)
        self.qtype, self.weights = qtype, qtype.upper()
        adapters = [s.adapter for s in served if s.adapter is not None]
        self.lora_ids = {name: i for i, name in enumerate(adapters)}
        self.byte_ids = {s.name: byte_token_ids(s.tok) for s in served}
        self.scorers: dict[str, GgufScorer] = {}
        self._scorer_lock = threading.Lock()

    def request_body(self, adapter: str | None, prompt_ids: list[int], params: Params) -> dict:
        body = {"prompt": prompt_ids, "n_predict": params.max_tokens, "return_tokens": True,
                "cache_prompt": True, **NEUTRAL_SAMPLING,
                "temperature": params.temperature, "top_p": params.top_p,
                "seed": params.seed if params.seed is not None else -1,
                "ignore_eos": params.ignore_eos}  # fmt: skip
        if params.logprobs is not None:  # 1 at least: the chosen token's own comes with the top
            body["n_probs"] = max(1, params.logprobs)
        if params.json_schema is not None:  # llama-server turns it into a grammar
            body["json_schema"] = params.json_schema
        if self.lora_ids:  # every adapter named: scale 1 for this one, 0 for the others
            mine = self.lora_ids.get(adapter) if adapter is not None else None
            body["lora"] = [{"id": i, "scale": 1.0 if i == mine else 0.0}
                            for i in self.lora_ids.values()]  # fmt: skip
        return body

    def _start(self, served, prompt_ids, params) -> Generation:
        body = self.request_body(served.adapter, prompt_ids, params)
        return LlamaGeneration(served, prompt_ids, params, self, body=body)

    async def prompt_scores(self, served, ids: list[int], k: int) -> list[TokenScore]:
        """llama-server scores no prompt (it has no `echo`), so llama.cpp's Python binding,
        built from the same source, reads the same GGUF files in this process: one scorer per
        served name, made on its first echo request (the weights are mapped, not copied)."""
        scorer = await anyio.to_thread.run_sync(self._scorer, served)
        return await anyio.to_thread.run_sync(scorer.score, ids, k)

    def _scorer(self, served) -> GgufScorer:
        with self._scorer_lock:
            if served.name not in self.scorers:
                lora = self.server.loras[self.lora_ids[served.adapter]] if served.adapter else None
                self.scorers[served.name] = GgufScorer.open(
                    self.server.model, lora, self.context_window, self.server.threads
                )
            return self.scorers[served.name]


@dataclass
class GgufScorer:
    """A GGUF base (with a GGUF LoRA) in llama.cpp's binding, every position's logits kept."""

    llm: Any
    lock: threading.Lock = field(default_factory=threading.Lock)  # one prompt at a time

    @classmethod
    def open(cls, model: Path, lora: Path | None, window: int, threads: int | None) -> GgufScorer:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise APIError(400, "echo with logprobs on the llama.cpp engine needs llama.cpp's "
                           "Python binding: pip install 'lorasft[llamacpp]' (or serve with "
                           "--engine transformers)", "echo") from e  # fmt: skip
        llm = Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=window,
                    logits_all=True, n_threads=threads or os.cpu_count(), verbose=False)  # fmt: skip
        return cls(llm)

    def score(self, ids: list[int], k: int) -> list[TokenScore]:
        with self.lock:
            self.llm.reset()
            self.llm.eval(ids)
            logits = torch.from_numpy(self.llm.scores[: len(ids)].copy())
        return prompt_scores_from_logits(logits, ids, k)


def served_config(spec: RunSpec, runs: list[RunSpec]):
    """The base's config as the runs extended it (RoPE scaling), read without loading weights."""
    config = read_config(spec.base_path, spec.cfg.model.trust_remote_code)
    context = served_context(runs)
    plan = plan_context(config, context) if context is not None else None
    if plan is not None and plan.kind == "rope":
        config.rope_parameters = rope_parameters(config.rope_parameters, plan)
    return config


def llamacpp_problem(base: str | None, adapters: list[tuple[str, str]],
                     binary: str | None = None, specs=None) -> str | None:  # fmt: skip
    """Why these runs cannot be served by llama.cpp here (None: they can), without loading."""
    if find_llama_server(binary) is None:
        return ("llama-server is not installed (`make llama-server` builds it into the venv; "
                f"or put it on PATH, or set ${BINARY_ENV})")  # fmt: skip
    try:
        spec, runs = specs or read_specs(base, adapters)
        check_llama(served_config(spec, runs))
        for r in runs:
            check_lora(r.dir)
    except ModelError as e:
        return str(e)
    return None


def load_llamacpp_engine(base: str | None, adapters: list[tuple[str, str]],
                         dtype: str | None = None, slots: int = 8, qtype: str = "f16",
                         binary: str | None = None, threads: int | None = None,
                         max_queue: int = DEFAULT_MAX_QUEUE, specs=None) -> LlamaCppEngine:  # fmt: skip
    """Export (or find cached) the base GGUF and the adapters' GGUF LoRAs, start llama-server."""
    if qtype not in GGUF_TYPES:
        raise ModelError(f"--gguf-type {qtype}: expected one of {', '.join(GGUF_TYPES)}")
    found = find_llama_server(binary)
    if found is None:
        raise ModelError(llamacpp_problem(base, adapters, binary))
    spec, runs = specs or read_specs(base, adapters, dtype)
    served = served_names(spec, runs)
    config = served_config(spec, runs)
    check_llama(config)  # before the (slow) base export
    for r in runs:
        check_lora(r.dir)
    model_file = base_gguf(spec, runs, qtype)
    loras = [lora_gguf(r, config) for r in runs]
    window = gguf_window(model_file)
    server = LlamaServer(found, model=model_file, loras=loras, slots=slots, ctx_per_slot=window,
                         threads=threads).start()  # fmt: skip
    say(f"llama-server {found} on {server.url}: {slots} slots of {window} tokens, "
        f"{len(loras)} LoRA adapter(s), {qtype} base")  # fmt: skip
    return LlamaCppEngine(served, window, server, qtype, max_queue)
