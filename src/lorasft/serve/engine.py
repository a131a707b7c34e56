"""One base model with its LoRA adapters, and the single worker thread that generates with it.

The model is not thread-safe and switching adapters is a model-wide change, so every request
becomes a job on one FIFO queue served by one thread: concurrent requests wait their turn.
Prompts are built by the same `build_prompt` that training used, with the tokenizer (and so the
chat template) saved in each adapter's run folder.
"""

from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList, set_seed
from transformers.generation.streamers import BaseStreamer

from lorasft.data.tokenize import stop_ids
from lorasft.eval.generate import GenSettings, encode_prompt
from lorasft.model.context import context_window
from lorasft.model.load import ModelError
from lorasft.model.run import RunSpec, open_runs
from lorasft.serve.textstream import TextCutter


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

    def settings(self) -> GenSettings:
        return GenSettings(max_new_tokens=self.max_tokens, top_k=0).with_temperature(
            self.temperature, top_p=self.top_p
        )


class _IdQueue(BaseStreamer):
    """Hands generated ids to the request thread; the first `put` is the prompt and is skipped."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self._prompt = True

    def put(self, value) -> None:
        if self._prompt:
            self._prompt = False
            return
        for t in value.reshape(-1).tolist():
            self.q.put(t)

    def end(self) -> None:
        self.q.put(None)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


@dataclass
class Generation:
    """One request's answer; `pieces()` yields text, then the counts and finish_reason are set."""

    served: Served
    prompt_ids: list[int]
    params: Params
    out: _IdQueue = field(default_factory=_IdQueue)
    cancel: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    finish_reason: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def pieces(self):
        cutter, last = TextCutter(self.served.tok, self.params.stop), None
        try:
            while (item := self.out.q.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                self.completion_tokens, last = self.completion_tokens + 1, item
                if text := cutter.add(item):
                    yield text
                if cutter.stopped:
                    break
            if text := cutter.flush():
                yield text
            stopped = cutter.stopped or last in stop_ids(self.served.tok)
            self.finish_reason = "stop" if stopped or last is None else "length"
        finally:
            self.cancel.set()  # the client left, or a stop string ended it: free the worker

    def text(self) -> str:
        return "".join(self.pieces())


class Engine:
    def __init__(self, model, served: list[Served], context_window: int):
        self.model, self.context_window = model, context_window
        self.served = {s.name: s for s in served}
        self.jobs: queue.Queue[Generation] = queue.Queue()
        self.tok_lock = threading.Lock()
        threading.Thread(target=self._work, daemon=True, name="lorasft-generate").start()

    def encode_chat(self, served: Served, messages: list[dict]) -> list[int]:
        """The prompt as the run trained on it: its template and its system prompt."""
        with self.tok_lock:
            return encode_prompt(served.spec.conversation(messages), served.tok)

    def encode_text(self, served: Served, prompt: str) -> list[int]:
        with self.tok_lock:
            return served.tok(prompt).input_ids

    def submit(self, served: Served, prompt_ids: list[int], params: Params) -> Generation:
        job = Generation(served, prompt_ids, params)
        self.jobs.put(job)
        return job

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if not job.cancel.is_set():  # a client that left while queued costs nothing
                self._run(job)

    def _run(self, job: Generation) -> None:
        tok = job.served.tok
        ids = torch.tensor([job.prompt_ids], device=self.model.device)
        try:
            with self._adapter(job.served), torch.no_grad():
                if job.params.seed is not None:
                    set_seed(job.params.seed)
                self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    streamer=job.out, **job.params.settings().kwargs(tok),
                                    stopping_criteria=StoppingCriteriaList([_Cancelled(job.cancel)]))  # fmt: skip
        except Exception as e:  # noqa: BLE001 (reported to the one request that caused it; the server goes on)
            job.out.q.put(e)
        job.out.q.put(None)

    def _adapter(self, served: Served):
        if not isinstance(self.model, PeftModel):
            return nullcontext()
        if served.adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(served.adapter)
        return nullcontext()


def load_engine(base: str | None, adapters: list[tuple[str, str]],
                dtype: str | None = None) -> Engine:  # fmt: skip
    """The base (by default the first adapter run's base, else the default model) and adapters,
    opened as the runs trained (dtype, attention, context extension)."""
    model, base_spec, runs = open_runs(base, adapters, dtype)
    names = [base_spec.name, *(r.name for r in runs)]
    if len(set(names)) != len(names):
        raise ModelError(f"served names must be unique, got {names} (the base is served as "
                         f"{names[0]!r}; rename the adapter)")  # fmt: skip
    served = [Served(base_spec.name, base_spec, None, str(base_spec.base_path))]
    served += [Served(r.name, r, r.name, str(r.dir)) for r in runs]
    return Engine(model, served, context_window(model.config))
