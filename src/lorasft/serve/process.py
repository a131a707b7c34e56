"""An engine's server process (llama-server, vllm serve) on a free loopback port with a random
key of its own: started, health-checked, stopped with lorasft, and never left behind.

The key means no one else on the machine can use the engine around lorasft's own key, bounds and
checks. The process runs in its own session (Ctrl-C reaches lorasft, which stops the engine in
turn) and, on Linux, gets SIGTERM if the lorasft thread that started it dies, even by SIGKILL
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lorasft.model.load import ModelError, cache_root
from lorasft.serve import DEFAULT_MAX_QUEUE
from lorasft.serve.engine import Engine, Generation
from lorasft.serve.schemas import APIError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _death_signal():
    """For the child before exec: SIGTERM when the thread that started it dies (Linux
    PR_SET_PDEATHSIG). libc is opened here, in the parent: the child only makes the call."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None
    return lambda: prctl(1, signal.SIGTERM)


@dataclass
class EngineProcess:
    """One engine server process; subclasses give its command line and environment."""

    binary: Path
    slots: int = 8  # requests it generates at once
    label: str = "engine"
    port: int = field(default_factory=free_port)
    key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    proc: subprocess.Popen | None = None
    log: Path | None = None
    health_path = "/health"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """Variables added to the engine's environment (its key: never on the command line)."""
        return {}

    def auth(self) -> dict[str, str]:
        """The header every request to the engine carries: lorasft's key of its own for it."""
        return {"Authorization": f"Bearer {self.key}"}

    def start(self, wait_s: float = 180) -> EngineProcess:
        self.log = cache_root() / "serve" / "logs" / f"{self.label}-{os.getpid()}-{self.port}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env()}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # Ctrl-C reaches lorasft, which stops the engine in turn
                preexec_fn=_death_signal(),  # noqa: PLW1509 (one libc call, no Python locks)
            )  # fmt: skip
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ModelError(f"{self.label} exited with code {self.proc.returncode} while "
                                 f"starting: {self.log_tail()}")  # fmt: skip
            if self.healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise ModelError(f"{self.label} did not become healthy within {wait_s:.0f} s: "
                         f"{self.log_tail()}")  # fmt: skip

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}{self.health_path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 12) -> str:
        if self.log is None or not self.log.is_file():
            return "(no log)"
        text = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        return f"log {self.log}:\n" + "\n".join(text)

    def stop(self, wait_s: float = 10) -> None:
        if not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class RemoteGeneration(Generation):
    """A request to an engine process: the body it is sent, and whether the whole answer is
    wanted at once (a client that does not stream) or token by token."""

    body: dict = field(default_factory=dict)
    whole: bool = False

    async def atext(self) -> str:
        self.whole = True
        return await super().atext()


class RemoteEngine(Engine):
    """An engine running in its own process (`server`), reached over loopback HTTP."""

    weights = "F32"

    def __init__(self, served, context_window: int, server: EngineProcess,
                 max_queue: int = DEFAULT_MAX_QUEUE):  # fmt: skip
        super().__init__(served, context_window, slots=server.slots, max_queue=max_queue)
        self.server = server
        self._http: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def http(self) -> httpx.AsyncClient:
        """One pooled client per event loop (building one costs milliseconds of CPU, which the
        engine's threads need); idle connections are dropped before the engine's own timeout."""
        loop = asyncio.get_running_loop()
        if loop not in self._http:
            limits = httpx.Limits(max_connections=None, keepalive_expiry=2.0)
            self._http[loop] = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                                 limits=limits)  # fmt: skip
        return self._http[loop]

    def error(self, message: str) -> APIError:
        return APIError(502, f"the {self.name} engine failed: {message}", None, "engine_error",
                        kind="server_error")  # fmt: skip

    def health(self) -> dict:
        ok = self.server.alive() and self.server.healthy()
        return {**super().health(), "ok": ok, "weights": self.weights}

    def close(self) -> None:
        self.server.stop()
