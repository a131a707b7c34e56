"""An engine's server process (llama-server, vllm serve) on a free loopback port with a random
key of its own: started, health-checked, stopped with lorasft, and never left behind.

The key means no one else on the machine can use the engine around lorasft's own key, bounds and
checks. The process runs in its own session (Ctrl-C reaches lorasft, which stops the engine in
turn) and, on Linux, gets SIGTERM if the lorasft thread that started it dies, even by SIGKILL
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lorasft.model.load import ModelError, cache_root


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
    port: int = field(default_factory=free_port)
    key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    label: str = "engine"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """Variables added to the engine's environment (its key: never on the command line)."""
        return {}

    health_path = "/health"

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
