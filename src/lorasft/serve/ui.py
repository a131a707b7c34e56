"""`lorasft ui`: a local dashboard on a runs folder. The run table updates while runs train
(status, step, loss, ETA, a live loss curve); each run's report; side-by-side comparison; a chat
panel that asks a finished run (and its base, side by side) through the same engine and routes
as `lorasft serve`.

No build step and no network: one HTML page with a little plain JavaScript that polls JSON; the
charts are the report's SVG, drawn by the server. Bound to 127.0.0.1 unless told otherwise;
with an API key every request needs it (header `Authorization: Bearer KEY`, or `?key=KEY` once,
which sets a cookie); only run folders that are direct children of the runs folder are served;
request bodies over 200 kB get a 413 before they are parsed.
"""

from __future__ import annotations

import re
import secrets
import threading
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import Field

from lorasft.model.load import ModelError
from lorasft.report.html import (
    compare_report,
    finished_results,
    line_chart,
    loss_series,
    page,
    run_report,
)
from lorasft.report.runs import is_run, progress_of, runs_table
from lorasft.serve.app import BodyLimit, validation_message
from lorasft.serve.engine_choice import EngineOptions, open_engine
from lorasft.serve.schemas import APIError, ValidText

NAME = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_REQUEST_BYTES = 200_000  # a 20,000-character message, every character escaped, fits


class ChatBody(ValidText):
    run: str
    message: str = Field(min_length=1, max_length=20_000)
    max_tokens: int = Field(default=64, ge=1, le=1024)
    with_base: bool = True


class Dashboard:
    """The runs folder, and at most one engine at a time (for the run being chatted with)."""

    def __init__(self, root: Path, opts: EngineOptions):
        self.root, self.opts = root.resolve(), opts
        self.engine, self.engine_run = None, None
        self.lock = threading.Lock()

    def run_dir(self, name: str) -> Path:
        """A run folder by name: a direct child of the runs folder, nothing else (404)."""
        path = (
            (self.root / name).resolve() if NAME.match(name) and name not in (".", "..") else None
        )
        if path is None or path.parent != self.root or not is_run(path):
            raise HTTPException(404, f"no run {name!r} in {self.root}")
        return path

    def engine_for(self, name: str):
        with self.lock:
            if self.engine_run != name:
                if self.engine is not None:
                    self.engine.close()
                    self.engine = None
                self.engine = open_engine(None, [(name, str(self.run_dir(name)))], None, self.opts)
                self.engine_run = name
            return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def create_ui(root: str | Path, opts: EngineOptions | None = None,
              api_key: str | None = None) -> FastAPI:  # fmt: skip
    from contextlib import asynccontextmanager

    board = Dashboard(Path(root), opts or EngineOptions())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        board.close()

    app = FastAPI(title="lorasft ui", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)  # fmt: skip
    app.state.board = board
    app.include_router(router)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(ModelError, _model_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    # Outermost last: the key is checked first, then the body is bounded before it is parsed.
    app.add_middleware(BodyLimit, max_bytes=MAX_REQUEST_BYTES, hint=": a chat message is at most "
                       "20,000 characters")  # fmt: skip
    if api_key:
        app.middleware("http")(_key_check(api_key))
    return app


async def _api_error(request: Request, e: APIError):
    return JSONResponse({"detail": e.message}, status_code=e.status, headers=e.headers)


async def _invalid_body(request: Request, e: RequestValidationError):
    """A body that is not the chat's JSON: 422 naming the field. (FastAPI's own handler echoes
    the body back and fails with a 500 on bytes that are not UTF-8.)"""
    return JSONResponse({"detail": validation_message(e)[0]}, status_code=422)


async def _model_error(request: Request, e: ModelError):  # a run the engine cannot open
    return JSONResponse({"detail": str(e)}, status_code=400)


def _key_check(api_key: str):
    """Every request needs the key: header, `?key=` (which sets a cookie), or that cookie."""

    async def require_key(request: Request, call_next):
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        given = given or request.query_params.get("key") or request.cookies.get("lorasft_key", "")
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            return JSONResponse({"error": "missing or wrong API key: open the page with ?key=KEY"},
                                status_code=401)  # fmt: skip
        response = await call_next(request)
        if request.query_params.get("key"):
            response.set_cookie("lorasft_key", api_key, httponly=True, samesite="strict")
        return response

    return require_key


router = APIRouter()


def _board(request: Request) -> Dashboard:
    return request.app.state.board


@router.get("/", response_class=HTMLResponse)
def index() -> str:
    return DASHBOARD


@router.get("/api/runs")
def runs(request: Request) -> dict:
    board = _board(request)
    rows, keys = runs_table(board.root)
    return {"root": str(board.root), "runs": rows, "differing": keys}


@router.get("/api/runs/{name}/curve", response_class=HTMLResponse)
def curve(name: str, request: Request) -> str:
    run = _board(request).run_dir(name)
    results = finished_results(run)  # None until the file is there whole
    if results is not None:
        log = results.get("log_history", [])
    else:
        log = (progress_of(run) or {}).get("log", [])
    train, evals = loss_series(log)
    return line_chart([{"name": "train loss", "points": train},
                       {"name": "eval loss", "points": evals, "dashed": True}],
                      chart_id=f"live-{name}")  # fmt: skip


@router.get("/runs/{name}/report", response_class=HTMLResponse)
def report(name: str, request: Request) -> str:
    run = _board(request).run_dir(name)
    results = finished_results(run)
    if results is None:
        return page(name, f"<h1>{name}</h1><p>still training: the report is written when it "
                    "finishes; the dashboard shows its progress</p>")  # fmt: skip
    return run_report(results, name, run)


@router.get("/compare", response_class=HTMLResponse)
def compare(runs: str, request: Request) -> str:
    names = [n for n in runs.split(",") if n]
    if len(names) < 2:
        raise HTTPException(400, "give two runs or more: /compare?runs=a,b")
    found = {n: finished_results(_board(request).run_dir(n)) for n in names}
    missing = [n for n, r in found.items() if r is None]
    if missing:
        raise HTTPException(409, f"not finished yet: {', '.join(missing)}")
    return compare_report(list(found.items()))


@router.post("/api/chat")
async def chat(body: ChatBody, request: Request) -> dict:
    from starlette.concurrency import run_in_threadpool

    from lorasft.serve.engine import Params

    board = _board(request)
    run = board.run_dir(body.run)
    if finished_results(run) is None:
        raise HTTPException(409, f"run {body.run!r} has not finished: chat with it afterwards")
    engine = await run_in_threadpool(board.engine_for, body.run)
    messages = [{"role": "user", "content": body.message}]
    out = {"engine": engine.name}
    names = [body.run, next(iter(engine.served))] if body.with_base else [body.run]
    for key, name in zip(("tuned", "base"), names):
        served = engine.served[name]
        ids = await run_in_threadpool(engine.encode_chat, served, messages)
        job = engine.submit(served, ids, Params(max_tokens=body.max_tokens, temperature=0.0))
        out[key] = await job.atext()
    return out


@router.get("/favicon.ico")
def favicon() -> Response:
    return Response(status_code=204)


DASHBOARD = """<!doctype html><html lang=en><meta charset=utf-8><title>lorasft runs</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI','Noto Sans CJK SC',sans-serif;margin:24px;color:#111}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f5f5f5}.num{text-align:right}.training,.evaluating{color:#2563eb;font-weight:600}
.finished{color:#059669}.stopped{color:#dc2626}.muted{color:#666}#chat textarea{width:520px;height:60px}
.answers{display:flex;gap:16px}.answers pre{white-space:pre-wrap;border:1px solid #ddd;padding:8px;
width:420px;min-height:40px;margin:4px 0}svg text{font:11px system-ui,sans-serif}
.legend span{margin-right:14px}
</style>
<h1>lorasft runs</h1><p class=muted id=root></p>
<table id=runs><thead><tr><th></th><th>run</th><th>status</th><th>step</th><th>loss</th>
<th>best eval loss</th><th>exact match</th><th>ETA</th><th>report</th></tr></thead><tbody></tbody></table>
<p><button id=compare>compare selected</button> <span class=muted>differing settings:
<span id=differing></span></span></p>
<h2>Loss <span id=curve-run class=muted></span></h2><div id=curve class=muted>choose a run</div>
<h2>Chat</h2><div id=chat><select id=chat-run></select><br>
<textarea id=message placeholder="a message to the tuned run (and its base)"></textarea><br>
<button id=send>send</button> <span id=chat-state class=muted></span>
<div class=answers><div><b>tuned</b><pre id=answer-tuned></pre></div>
<div><b>base</b><pre id=answer-base></pre></div></div></div>
<script>
let chosen = null;
const fmt = (v, d) => v === null || v === undefined ? '—' : (typeof v === 'number' ? v.toFixed(d) : v);
const eta = s => s === null || s === undefined ? '' : (s >= 60 ? Math.round(s / 60) + ' min' : Math.round(s) + ' s');
function row(r) {
  const tr = document.createElement('tr'); tr.dataset.run = r.name;
  tr.innerHTML = `<td><input type=checkbox value="${r.name}"></td><td><a href="#" class=pick>${r.name}</a></td>
    <td class="status ${r.status}">${r.status}</td><td class="num step">${fmt(r.step, 0)}/${fmt(r.max_steps, 0)}</td>
    <td class=num>${fmt(r.loss, 4)}</td><td class=num>${fmt(r.best_eval_loss, 4)}</td>
    <td class=num>${fmt(r.exact_match, 2)}</td><td>${r.status === 'training' ? eta(r.eta_s) : ''}</td>
    <td>${r.status === 'finished' ? `<a href="runs/${encodeURIComponent(r.name)}/report">report</a>` : ''}</td>`;
  tr.querySelector('.pick').onclick = e => { e.preventDefault(); chosen = r.name; refreshCurve(); };
  return tr;
}
async function refresh() {
  const res = await fetch('api/runs'); if (!res.ok) return;
  const data = await res.json();
  document.getElementById('root').textContent = data.root;
  document.getElementById('differing').textContent = data.differing.join(', ') || 'none';
  const checked = new Set([...document.querySelectorAll('#runs input:checked')].map(i => i.value));
  const body = document.querySelector('#runs tbody'); body.innerHTML = '';
  data.runs.forEach(r => { const tr = row(r); if (checked.has(r.name)) tr.querySelector('input').checked = true; body.appendChild(tr); });
  const sel = document.getElementById('chat-run'), keep = sel.value;
  sel.innerHTML = data.runs.filter(r => r.status === 'finished').map(r => `<option>${r.name}</option>`).join('');
  if (keep) sel.value = keep;
  if (!chosen && data.runs.length) chosen = data.runs[data.runs.length - 1].name;
  refreshCurve();
}
async function refreshCurve() {
  if (!chosen) return;
  const res = await fetch(`api/runs/${encodeURIComponent(chosen)}/curve`);
  if (res.ok) { document.getElementById('curve').innerHTML = await res.text();
    document.getElementById('curve-run').textContent = chosen; }
}
document.getElementById('compare').onclick = () => {
  const names = [...document.querySelectorAll('#runs input:checked')].map(i => i.value);
  if (names.length > 1) location.href = 'compare?runs=' + names.map(encodeURIComponent).join(',');
};
document.getElementById('send').onclick = async () => {
  const state = document.getElementById('chat-state'); state.textContent = 'asking…';
  const res = await fetch('api/chat', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({run: document.getElementById('chat-run').value,
                          message: document.getElementById('message').value})});
  const data = await res.json();
  if (!res.ok) { state.textContent = data.detail || JSON.stringify(data); return; }
  document.getElementById('answer-tuned').textContent = data.tuned;
  document.getElementById('answer-base').textContent = data.base ?? '';
  state.textContent = 'answered by ' + data.engine;
};
refresh(); setInterval(refresh, 1000);
</script>
"""
