"""What `lorasft serve` generates with: the served names, the prompt as the run trained on it,
admission (slots plus a bounded queue), and the engines behind the same interface.

An engine turns prompt token ids into generated token ids; everything a client sees is decided
here and is the same for every engine: prompts are built by the same `build_prompt` that
training used, with the tokenizer (and so the chat template) saved in each adapter's run folder;
text is decoded from the ids by that tokenizer and cut at stop strings by `TextCutter`; a request
ends at the run's stop ids. `TransformersEngine` is the reference: it generates exactly as
training's evaluation does, one request at a time. `serve/llamacpp_engine.py` and `serve/vllm.py` put
the same requests on the field's batching servers.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import anyio
import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList, set_seed
from transformers.generation.streamers import BaseStreamer

from lorasft.data.tokenize import prompt_ids
from lorasft.model.context import context_window
from lorasft.model.generation import GenSettings
from lorasft.model.load import ModelError
from lorasft.model.reopen import RunSpec, open_runs, read_specs
from lorasft.serve import DEFAULT_MAX_QUEUE
from lorasft.serve.logprobs import TokenScore, prompt_scores_from_logits, scores_from_logits
from lorasft.serve.schemas import APIError
from lorasft.serve.textstream import TextCutter

RETRY_AFTER_S = 1


@dataclass
class Served:
    """A name clients can put in `model`: the base (adapter None) or one adapter on it."""

    name: str
    spec: RunSpec  # the run (or bare base): its tokenizer, template, system prompt, stop ids
    adapter: str | None
    source: str

    @property
    def tok(self):
        return self.spec.tok


@dataclass
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    """Generate past the run's stop ids, up to max_tokens (stop strings still end it)."""
    logprobs: int | None = None
    """None: no log-probabilities; k: each generated token's, with the k most likely."""
    json_schema: dict | None = None
    """The JSON schema the answer must follow (response_format); None: free text."""

    def stop_ids(self, served: Served) -> list[int]:
        return [] if self.ignore_eos else served.spec.stops

    def settings(self) -> GenSettings:
        return GenSettings(max_new_tokens=self.max_tokens, top_k=0).with_temperature(
            self.temperature, top_p=self.top_p
        )


@dataclass
class Generation:
    """One request's answer. `stream()` yields text; then counts and finish_reason are set.
    Engines supply `_tokens()`, the generated ids; `close()` frees the request's slot."""

    served: Served
    prompt_ids: list[int]
    params: Params
    engine: Engine
    completion_tokens: int = 0
    finish_reason: str | None = None
    ended_at_stop: bool = False  # the engine stopped at an end-of-generation token it withheld
    engine_count: int | None = None  # tokens generated, as the engine counted them
    scores: list[TokenScore] = field(default_factory=list)  # params.logprobs: one per token
    consumed: int = 0  # tokens the answer read (an engine may send more than a stop string lets in)
    _taken: int = field(default=0, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    async def stream(self) -> AsyncIterator[str]:
        stops = set(self.params.stop_ids(self.served))
        cutter, last = TextCutter(self.served.tok, self.params.stop), None
        tokens = self._tokens()
        try:
            async for token in tokens:
                self.completion_tokens, last = self.completion_tokens + 1, token
                self.consumed += 1
                if text := cutter.add(token):
                    yield text
                if cutter.stopped or token in stops:
                    break
            if text := cutter.flush():
                yield text
            ended = cutter.stopped or last in stops or self.ended_at_stop or last is None
            self.finish_reason = "stop" if ended else "length"
            if self.engine_count is not None:
                self.completion_tokens = self.engine_count
        finally:
            await tokens.aclose()  # ends the engine's request (a stop id or string came first)
            self.close()  # also when the client left mid-stream: the slot is freed at once

    async def atext(self) -> str:
        return "".join([piece async for piece in self.stream()])

    def take_scores(self) -> list[TokenScore]:
        """The log-probabilities of the answer's tokens read since the last call, a final stop
        token included (its text is not in the answer; vLLM and llama-server also list it)."""
        end = min(self.consumed, len(self.scores))
        new, self._taken = self.scores[self._taken : end], max(self._taken, end)
        return new

    def text(self) -> str:
        """The whole answer, for synchronous callers (scripts, tests); from inside a running
        event loop it waits on a thread of its own."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.atext())
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self.atext()).result()

    def _tokens(self) -> AsyncIterator[int]:
        raise NotImplementedError

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cancel()
            self.engine.release()

    def _cancel(self) -> None:
        pass


class Engine:
    """Served names, the window, and admission: `slots` requests generate at once and up to
    `max_queue` more wait; past that `submit` refuses with 503 and Retry-After."""

    name = "engine"

    def __init__(self, served: list[Served], context_window: int, slots: int = 1,
                 max_queue: int = DEFAULT_MAX_QUEUE):  # fmt: skip
        self.served = {s.name: s for s in served}
        self.context_window, self.slots, self.max_queue = context_window, slots, max_queue
        self.tok_lock = threading.Lock()
        self._admitted, self._admit_lock = 0, threading.Lock()

    def encode_chat(self, served: Served, messages: list[dict]) -> list[int]:
        """The prompt as the run trained on it: its template and its system prompt."""
        with self.tok_lock:
            return prompt_ids(served.spec.conversation(messages), served.tok)

    def encode_text(self, served: Served, prompt: str) -> list[int]:
        with self.tok_lock:
            return served.tok(prompt).input_ids

    @property
    def in_flight(self) -> int:
        return self._admitted

    def reserve(self) -> None:
        """Take a place among the slots and the queue, or refuse with 503 and Retry-After. The
        routes reserve before anything else (no thread pool, no tokenizer), so a full server
        refuses in one turn of the event loop however busy the machine is."""
        with self._admit_lock:
            if self._admitted >= self.slots + self.max_queue:
                raise APIError(503, f"the server is busy: {self.slots} requests generating and "
                               f"{self.max_queue} waiting (--max-queue); retry after "
                               f"{RETRY_AFTER_S} s", None, "server_busy", kind="server_error",
                               headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
            self._admitted += 1

    def start(self, served: Served, prompt_ids: list[int], params: Params) -> Generation:
        """Generate in a place `reserve` took (the generation gives it back when closed; the
        caller does if this raises)."""
        return self._start(served, prompt_ids, params)

    def submit(self, served: Served, prompt_ids: list[int], params: Params) -> Generation:
        """`reserve`, then `start`."""
        self.reserve()
        try:
            return self._start(served, prompt_ids, params)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        with self._admit_lock:
            self._admitted -= 1

    def _start(self, served: Served, prompt_ids: list[int], params: Params) -> Generation:
        raise NotImplementedError

    async def prompt_scores(self, served: Served, ids: list[int], k: int) -> list[TokenScore]:
        """The log-probability of each prompt token given those before it (the first has
        none), with the k most likely tokens at each position: what `echo` returns."""
        raise APIError(400, f"echo with logprobs: the {self.name} engine cannot score a prompt; "
                       "serve with --engine transformers", "echo")  # fmt: skip

    def check_params(self, params: Params) -> None:
        """An APIError (400) naming a field this engine cannot honour."""

    def health(self) -> dict:
        """What /health reports beyond the served names; `ok` False turns it into a 503."""
        return {"ok": True, "engine": self.name, "slots": self.slots, "in_flight": self.in_flight}

    def close(self) -> None:
        """Stop what the engine started (a server process); called when the server stops."""


class _IdQueue(BaseStreamer):
    """Hands generated ids to the request; the first `put` is the prompt and is skipped. With
    `logits` (the last logits the model computed, filled by a hook on its output layer) each
    id's log-probabilities go to `scores` first."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self._prompt = True
        self.top: int | None = None
        self.logits: list[torch.Tensor] = []
        self.scores: list[TokenScore] | None = None

    def put(self, value) -> None:
        if self._prompt:
            self._prompt = False
            return
        tokens = value.reshape(-1).tolist()
        if self.scores is not None and self.logits:
            self.scores += scores_from_logits(self.logits.pop()[None], tokens[-1:], self.top)
        for t in tokens:
            self.q.put(t)

    def keep_logits(self, module, args, output) -> None:
        """Forward hook on the output layer: the logits of the last position of this step."""
        self.logits[:] = [output[0, -1].detach()]

    def end(self) -> None:
        self.q.put(None)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


@dataclass
class LocalGeneration(Generation):
    out: _IdQueue = field(default_factory=_IdQueue)
    cancel: threading.Event = field(default_factory=threading.Event)

    async def _tokens(self) -> AsyncIterator[int]:
        while True:  # abandoned (not waited for) when the client leaves; the worker then stops
            item = await anyio.to_thread.run_sync(self.out.q.get, abandon_on_cancel=True)
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def _cancel(self) -> None:
        self.cancel.set()


@dataclass
class _Scoring:
    """A prompt to score on the worker thread (echo): the answer comes back through `done`."""

    served: Served
    ids: list[int]
    k: int
    done: Future = field(default_factory=Future)


class TransformersEngine(Engine):
    """The model with its adapters in transformers, and one worker thread: the model is not
    thread-safe and switching adapters is a model-wide change, so requests run one at a time."""

    name = "transformers"

    def check_params(self, params: Params) -> None:
        if params.json_schema is not None:
            raise APIError(400, "response_format: the transformers engine cannot constrain an "
                           "answer to JSON; serve with --engine llama.cpp (the default on a CPU "
                           "where llama-server is installed) or vllm", "response_format")  # fmt: skip

    def __init__(self, model, served: list[Served], context_window: int,
                 max_queue: int = DEFAULT_MAX_QUEUE):  # fmt: skip
        super().__init__(served, context_window, slots=1, max_queue=max_queue)
        self.model = model
        self.jobs: queue.Queue[LocalGeneration | _Scoring] = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name="lorasft-generate").start()

    def _start(self, served: Served, prompt_ids: list[int], params: Params) -> Generation:
        job = LocalGeneration(served, prompt_ids, params, self)
        self.jobs.put(job)
        return job

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if isinstance(job, _Scoring):
                self._score(job)
            elif job.cancel.is_set():  # a client that left while queued costs nothing
                job.out.q.put(None)
            else:
                self._run(job)

    async def prompt_scores(self, served: Served, ids: list[int], k: int) -> list[TokenScore]:
        job = _Scoring(served, ids, k)
        self.jobs.put(job)
        return await anyio.to_thread.run_sync(job.done.result)

    def _run(self, job: LocalGeneration) -> None:
        tok = job.served.tok
        ids = torch.tensor([job.prompt_ids], device=self.model.device)
        hook = None
        if job.params.logprobs is not None:
            job.out.top, job.out.scores = job.params.logprobs, job.scores
            head = self.model.get_output_embeddings()
            hook = head.register_forward_hook(job.out.keep_logits)
        try:
            with self._adapter(job.served), torch.no_grad():
                if job.params.seed is not None:
                    set_seed(job.params.seed)
                self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    streamer=job.out,
                                    **job.params.settings().kwargs(tok, job.params.stop_ids(job.served)),
                                    stopping_criteria=StoppingCriteriaList([_Cancelled(job.cancel)]))  # fmt: skip
        except Exception as e:  # noqa: BLE001 (reported to the one request that caused it; the server goes on)
            job.out.q.put(e)
        finally:
            if hook is not None:
                hook.remove()
        job.out.q.put(None)

    def _score(self, job: _Scoring) -> None:
        try:
            with self._adapter(job.served), torch.no_grad():
                ids = torch.tensor([job.ids], device=self.model.device)
                logits = self.model(input_ids=ids).logits[0]
            job.done.set_result(prompt_scores_from_logits(logits, job.ids, job.k))
        except Exception as e:  # noqa: BLE001 (reported to the request)
            job.done.set_exception(e)

    def _adapter(self, served: Served):
        if not isinstance(self.model, PeftModel):
            return nullcontext()
        if served.adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(served.adapter)
        return nullcontext()


def served_names(base_spec: RunSpec, runs: list[RunSpec]) -> list[Served]:
    names = [base_spec.name, *(r.name for r in runs)]
    if len(set(names)) != len(names):
        raise ModelError(f"served names must be unique, got {names} (the base is served as "
                         f"{names[0]!r}; rename the adapter)")  # fmt: skip
    served = [Served(base_spec.name, base_spec, None, str(base_spec.base_path))]
    return served + [Served(r.name, r, r.name, str(r.dir)) for r in runs]


def load_engine(base: str | None, adapters: list[tuple[str, str]], dtype: str | None = None,
                max_queue: int = DEFAULT_MAX_QUEUE, specs=None) -> TransformersEngine:  # fmt: skip
    """The base (by default the first adapter run's base, else the default model) and adapters
    in transformers, opened as the runs trained (dtype, attention, context extension); `specs`:
    `read_specs`' answer when the caller has read the runs already."""
    base_spec, runs = specs or read_specs(base, adapters, dtype)
    served = served_names(base_spec, runs)
    model = open_runs(base_spec, runs)
    return TransformersEngine(model, served, context_window(model.config), max_queue)
