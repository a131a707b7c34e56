"""Load on `lorasft serve` over loopback: one client, then N concurrent clients, each for a bounded
time, against the default model (SmolLM2-135M-Instruct) started as a subprocess.

Prints requests/s, completion tokens/s and p50/p95 latency for both, and their ratios. Figures
only: never part of the test verdict. Greedy chat requests on the demo eval prompts.

    python bench/serve_load.py [--clients 4] [--seconds 10] [--max-tokens 16] [--url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from importlib.resources import files

import httpx


def prompts() -> list[str]:
    lines = (
        (files("lorasft") / "assets" / "demo_eval.jsonl").read_text(encoding="utf-8").splitlines()
    )
    recs = [json.loads(line) for line in lines if line.strip()]
    return [f"{r['instruction']}\n\n{r['input']}".strip() for r in recs]


def start_server(module: list[str], wait: float = 180) -> tuple[subprocess.Popen, str]:
    """`python -m MODULE... --port P` on a free port, once its OpenAI API answers (any
    OpenAI-compatible server: `lorasft serve`, `llama_cpp.server`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", *module, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"the server did not start: run `{' '.join(cmd)}` by hand to see why")


def client(url: str, model: str, texts: list[str], stop_at: float, max_tokens: int,
           out: list[tuple[float, int]], offset: int) -> None:  # fmt: skip
    with httpx.Client(base_url=url, timeout=300) as http:
        i = offset
        while time.monotonic() < stop_at:
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": texts[i % len(texts)]}]}  # fmt: skip
            t0 = time.perf_counter()
            r = http.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            out.append((time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]))
            i += 1


def phase(url: str, model: str, n: int, seconds: float, max_tokens: int) -> dict:
    texts, results = prompts(), []
    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(url, model, texts, start + seconds,
                                                      max_tokens, results, k * 7))
               for k in range(n)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start  # includes the requests still running at the deadline
    lat = sorted(r[0] for r in results)
    return {"clients": n, "requests": len(results), "req_s": len(results) / wall,
            "tok_s": sum(r[1] for r in results) / wall, "p50": statistics.median(lat),
            "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0, help="per phase (two phases)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--base", default="default")
    ap.add_argument("--url", help="an already running server (default: start one)")
    a = ap.parse_args()
    proc, url = (None, a.url) if a.url else start_server(["lorasft", "serve", "--base", a.base])
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        phase(url, model, 1, 2.0, a.max_tokens)  # warm-up
        rows = [phase(url, model, n, a.seconds, a.max_tokens) for n in (1, a.clients)]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"model {model}; max_tokens {a.max_tokens}; {a.seconds:.0f} s per phase")  # fmt: skip
    print(f"{'clients':>8} {'requests':>9} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7}")
    for r in rows:
        print(f"{r['clients']:>8} {r['requests']:>9} {r['req_s']:>7.2f} {r['tok_s']:>8.1f} "
              f"{r['p50']:>7.2f} {r['p95']:>7.2f}")  # fmt: skip
    one, many = rows
    print(
        f"{a.clients} clients vs 1: throughput x{many['tok_s'] / one['tok_s']:.2f}, "
        f"p50 latency x{many['p50'] / one['p50']:.2f} (one generation at a time: requests queue)"
    )


if __name__ == "__main__":
    main()
