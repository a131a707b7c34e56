"""The endpoints: /health, /v1/models, /v1/chat/completions, /v1/completions (OpenAI formats)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError as JinjaError
from starlette.background import BackgroundTask

from lorasft.serve.engine import Engine, Generation, Params, Served
from lorasft.serve.logprobs import TokenScore, chat_content, completion_logprobs
from lorasft.serve.schemas import APIError, ChatRequest, CompletionRequest, Sampling, error_body

router = APIRouter()


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _served(engine: Engine, name: str) -> Served:
    if name not in engine.served:
        raise APIError(404, f"model {name!r} is not served here; choose one of "
                       f"{', '.join(engine.served)} (GET /v1/models)", "model", "model_not_found")  # fmt: skip
    return engine.served[name]


def _params(request: Request, req: Sampling, n_prompt: int, field: str) -> Params:
    """max_tokens against the server's cap, prompt + max_tokens against the context window."""
    cap, window = request.app.state.max_tokens_cap, _engine(request).context_window
    room = window - n_prompt
    if room < 1:
        raise APIError(400, f"the prompt is {n_prompt} tokens; model {req.model!r} has a context "
                       f"window of {window} tokens: shorten the {field}", field,
                       "context_length_exceeded")  # fmt: skip
    bound = req.answer_bound()
    name = (
        "max_tokens" if bound is not None and bound == req.max_tokens else "max_completion_tokens"
    )
    max_tokens = bound if bound is not None else min(cap, room)
    if max_tokens > cap:
        raise APIError(400, f"{name}={max_tokens} is above this server's cap of {cap} "
                       "(--max-tokens-cap)", name)  # fmt: skip
    if max_tokens > room:
        raise APIError(400, f"prompt ({n_prompt} tokens) + {name} ({max_tokens}) exceeds the "
                       f"context window of {window} tokens: lower {name} to {room} or less",
                       name, "context_length_exceeded")  # fmt: skip
    params = Params(max_tokens, req.temperature, req.top_p, req.stop, req.seed, req.ignore_eos,
                    req.logprobs_wanted(), req.json_schema())  # fmt: skip
    _engine(request).check_params(params)
    return params


@contextmanager
def _reserved(engine: Engine) -> Iterator[None]:
    """A place in the engine, taken before the prompt is encoded: a full server answers 503 at
    once, not after a thread-pool hop and the tokenizer, which a loaded CPU delays by seconds.
    Given back if no generation starts in it."""
    engine.reserve()
    started = False
    try:
        yield
        started = True
    finally:
        if not started:
            engine.release()


def _encode_chat(engine: Engine, served: Served, messages: list[dict]) -> list[int]:
    try:
        return engine.encode_chat(served, messages)
    except (JinjaError, ValueError) as e:  # a template that refuses these roles, or none at all
        raise APIError(400, f"model {served.name!r}: the messages cannot be rendered with its "
                       f"chat template ({e}); for raw text use /v1/completions", "messages") from e  # fmt: skip


@router.get("/health")
async def health(request: Request):
    engine = _engine(request)
    state = await run_in_threadpool(engine.health)
    body = {"status": "ok" if state.pop("ok") else "engine_down", "models": list(engine.served),
            **state}  # fmt: skip
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "lorasft",
         "root": s.source, "parent": None if s.adapter is None else next(iter(_engine(request).served))}
        for name, s in _engine(request).served.items()]}  # fmt: skip


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    engine = _engine(request)
    served = _served(engine, req.model)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    with _reserved(engine):
        ids = await run_in_threadpool(_encode_chat, engine, served, messages)
        job = engine.start(served, ids, _params(request, req, len(ids), "messages"))
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return _sse(_chat_chunks(job, {**head, "object": "chat.completion.chunk"}, usage), job)
    text = await _answer(request, job)
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "finish_reason": job.finish_reason, "logprobs": _chat_logprobs(job)}  # fmt: skip
    return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(job)}


def _chat_logprobs(job: Generation) -> dict | None:
    """The scores of the tokens read since the last call, as a chat choice's `logprobs`."""
    if job.params.logprobs is None:
        return None
    return {"content": chat_content(job.served.tok, job.take_scores()), "refusal": None}


def _prompt_ids(engine: Engine, served: Served, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = engine.encode_text(served, prompt)
        if not ids:  # nothing to continue from (a tokenizer without BOS, an empty string)
            raise APIError(400, "prompt: the prompt is empty (no tokens)", "prompt")
        return ids
    vocab = len(served.tok)
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"prompt: token id {bad} is outside the vocabulary of model "
                       f"{served.name!r} (ids 0-{vocab - 1})", "prompt")  # fmt: skip
    return list(prompt)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    engine = _engine(request)
    served = _served(engine, req.model)
    with _reserved(engine):
        ids = await run_in_threadpool(_prompt_ids, engine, served, req.prompt)
        params = _params(request, req, len(ids), "prompt")
        echoed = _Echo(served.tok.decode(ids) if req.echo else "")
        if req.echo and params.logprobs is not None:
            echoed.scores = await engine.prompt_scores(served, ids, params.logprobs)
        job = engine.start(served, ids, params)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": req.model}  # fmt: skip
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return _sse(_text_chunks(job, head, usage, echoed), job)
    text = await _answer(request, job)
    choice = {"index": 0, "text": echoed.text + text, "finish_reason": job.finish_reason,
              "logprobs": _text_logprobs(job, echoed)}  # fmt: skip
    return {**head, "choices": [choice], "usage": _usage(job)}


@dataclass
class _Echo:
    """What `echo` puts before the answer: the prompt's text and (with logprobs) its scores."""

    text: str
    scores: list[TokenScore] = field(default_factory=list)


def _text_logprobs(job: Generation, echoed: _Echo, offset: int = 0) -> dict | None:
    """A text choice's `logprobs`: the echoed prompt's scores (then emptied) and the scores of
    the answer's tokens read since the last call; offsets count from `offset` characters."""
    if job.params.logprobs is None:
        return None
    scores, echoed.scores = [*echoed.scores, *job.take_scores()], []
    return completion_logprobs(job.served.tok, scores, offset)


def _usage(job: Generation) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}  # fmt: skip


async def _answer(request: Request, job: Generation) -> str:
    """The whole answer; generation stops (its slot freed) if the client leaves before it ends."""
    task = asyncio.ensure_future(job.atext())
    try:
        while not (await asyncio.wait({task}, timeout=0.25))[0]:
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "the client closed the connection", None, "client_closed")
        return task.result()
    finally:
        job.close()


async def _chat_chunks(job: Generation, head: dict, usage: bool) -> AsyncIterator[dict]:
    def chunk(delta: dict, finish: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if job.params.logprobs is not None:
            choice["logprobs"] = _chat_logprobs(job)
        return {**head, "choices": [choice]}

    yield chunk({"role": "assistant", "content": ""})
    async for piece in job.stream():
        yield chunk({"content": piece})
    yield chunk({}, job.finish_reason)
    if usage:
        yield {**head, "choices": [], "usage": _usage(job)}


async def _text_chunks(job: Generation, head: dict, usage: bool,
                       echoed: _Echo) -> AsyncIterator[dict]:  # fmt: skip
    sent = 0

    def chunk(text: str, finish: str | None = None) -> dict:
        nonlocal sent
        logprobs, sent = _text_logprobs(job, echoed, sent), sent + len(text)
        return {**head, "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                     "logprobs": logprobs}]}  # fmt: skip

    if echoed.text:
        yield chunk(echoed.text)
    async for piece in job.stream():
        yield chunk(piece)
    yield chunk("", job.finish_reason)
    if usage:
        yield {**head, "choices": [], "usage": _usage(job)}


def _sse(chunks: AsyncIterator[dict], job: Generation) -> StreamingResponse:
    """Server-sent events; an error after the headers went out can only be reported in-stream.
    A client that leaves cancels the stream (the generation stops); `job.close` also runs after
    the response, for a client gone before the first chunk."""

    async def events() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
        except Exception as e:  # noqa: BLE001 (the status line is out: say it in the stream)
            yield f"data: {json.dumps(error_body(f'generation failed: {e}', 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             background=BackgroundTask(job.close),
                             headers={"Cache-Control": "no-cache"})  # fmt: skip
