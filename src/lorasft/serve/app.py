"""The FastAPI application: API key and body-size guards, OpenAI-style errors, uvicorn launch.

The guards are plain ASGI middleware so they answer before FastAPI reads or parses a body: a
client without the key gets 401 even for a malformed body, and an oversized body is never held
in memory beyond the limit.
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorasft.serve.engine import Engine
from lorasft.serve.routes import router
from lorasft.serve.schemas import APIError, error_body

DEFAULT_MAX_TOKENS_CAP = 1024
DEFAULT_MAX_REQUEST_BYTES = 1_000_000


async def _reply(scope, receive, send, status: int, message: str, kind: str, code: str) -> None:
    response = JSONResponse(error_body(message, kind, None, code), status_code=status)
    await response(scope, receive, send)


class RequireKey:
    """401 on /v1/* without `Authorization: Bearer KEY`; /health stays open for probes."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                return await _reply(scope, receive, send, 401, "missing or wrong API key: send the header "
                                    "'Authorization: Bearer <key>'", "authentication_error",
                                    "invalid_api_key")  # fmt: skip
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `max_bytes`, declared (Content-Length) or streamed (chunked)."""

    def __init__(self, app, max_bytes: int, hint: str = " (--max-request-bytes)"):
        self.app, self.max_bytes, self.hint = app, max_bytes, hint

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    async def _too_large(self, scope, receive, send) -> None:
        await _reply(scope, receive, send, 413, f"request body over {self.max_bytes} bytes{self.hint}",
                     "invalid_request_error", "request_too_large")  # fmt: skip


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()  # later calls wait for the disconnect, as the server's would
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('msg')})", None
    if not loc and first.get("type") == "model_attributes_type":
        return "the request body must be a JSON object (send Content-Type: application/json)", None
    where = ".".join(loc) or "body"
    return f"{where}: {first.get('msg')}", (loc[0] if loc else None)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status,
                            headers=e.headers)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(e)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        body = error_body(
            f"{request.method} {request.url.path}: {e.detail}", "invalid_request_error"
        )
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {e}", "server_error"), status_code=500)


def create_app(engine: Engine, api_key: str | None = None,
               max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:  # fmt: skip
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()  # the engine's server process stops with this one (Ctrl-C, SIGTERM)

    app = FastAPI(title="lorasft", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)  # fmt: skip
    app.state.engine, app.state.max_tokens_cap = engine, max_tokens_cap
    app.include_router(router)
    _install_errors(app)
    # Added last runs first: the key is checked before the body is read.
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(RequireKey, key=api_key)
    return app


def serve(app: FastAPI, host: str, port: int) -> None:
    uvicorn.run(app, host=host, port=port, log_level="info")
