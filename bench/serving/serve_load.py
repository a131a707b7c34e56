"""Load on the serving engines over loopback, in one run: the same clients (1, 4, 8, 16 at once,
each for a bounded time, fixed prompts, greedy, fixed max_tokens, streamed) against

  transformers   `lorasft serve --engine transformers` (the reference, one request at a time)
  llama.cpp      `lorasft serve --engine llama.cpp` (llama-server behind lorasft, the run's
                 adapter as a GGUF LoRA on the f16 base)
  llama.cpp x2   the same with two adapters, clients alternating between them
  bare lora      llama-server alone with the same files and flags (what lorasft's front costs)
  bare merged    llama-server alone with the run merged into one f16 GGUF by `lorasft export`
                 (what applying the LoRA at run time costs)

Prints requests/s, completion tokens/s, p50/p95 latency, p50 time to first token, and ratios.
Figures only: never part of the test verdict.

    python bench/serving/serve_load.py [--run bench-out/demo-run] [--seconds 8] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from importlib.resources import files
from pathlib import Path

import httpx

from lorasft.serve.llamacpp_engine import LlamaServer, find_llama_server
from lorasft.serve.process import free_port

CLIENTS = (1, 4, 8, 16)
SERVERS = ("transformers", "llama.cpp", "llama.cpp x2", "bare lora", "bare merged")


def cpu_name() -> str:
    """The CPU model, for the machine line every bench prints."""
    lines = (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    )
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                platform.machine())  # fmt: skip


def prompts() -> list[str]:
    lines = (files("lorasft") / "assets" / "demo_eval.jsonl").read_text("utf-8").splitlines()
    recs = [json.loads(line) for line in lines if line.strip()]
    return [f"{r['instruction']}\n\n{r['input']}".strip() for r in recs]


def start_server(module: list[str], wait: float = 600) -> tuple[subprocess.Popen, str]:
    """`python -m MODULE... --port P` on a free port, once its OpenAI API answers (any
    OpenAI-compatible server: `lorasft serve`, `llama_cpp.server`)."""
    port = free_port()
    cmd = [sys.executable, "-m", *module, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"`{' '.join(cmd)}` did not start: {proc.stderr.read()[-2000:]}")


def client(url: str, headers: dict, bodies: list[dict], stop_at: float,
           out: list[tuple[float, float, int]], offset: int) -> None:  # fmt: skip
    # a new connection per request (kept ones race the servers' idle timeouts), for every server
    no_keep = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, headers=headers, timeout=300, limits=no_keep) as http:
        i = offset
        while time.monotonic() < stop_at:
            body = bodies[i % len(bodies)]
            t0, first, tokens = time.perf_counter(), None, 0
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            out.append((time.perf_counter() - t0, first or 0.0, tokens))
            i += 1


def phase(url: str, headers: dict, bodies: list[dict], n: int, seconds: float) -> dict:
    results: list[tuple[float, float, int]] = []
    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(url, headers, bodies, start + seconds,
                                                     results, k * 7))
               for k in range(n)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start  # includes the requests still running at the deadline
    lat, ttft = sorted(r[0] for r in results), sorted(r[1] for r in results)
    return {"clients": n, "requests": len(results), "req_s": len(results) / wall,
            "tok_s": sum(r[2] for r in results) / wall, "p50": statistics.median(lat),
            "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "ttft": statistics.median(ttft)}  # fmt: skip


def bodies_for(models: list[str], max_tokens: int, extra: list[dict] | None = None) -> list[dict]:
    """One body per prompt, the models (adapters) alternating from one request to the next."""
    out = []
    for i, text in enumerate(prompts()):
        k = i % len(models)
        out.append({"model": models[k], "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": text}], "stream": True,
                    "stream_options": {"include_usage": True}, **(extra[k] if extra else {})})  # fmt: skip
    return out


def measure(name: str, url: str, headers: dict, bodies: list[dict], seconds: float) -> list[dict]:
    phase(url, headers, bodies, 1, 2.0)  # warm-up
    rows = [{"server": name, **phase(url, headers, bodies, n, seconds)} for n in CLIENTS]
    for r in rows:
        print(f"  {name:<13} {r['clients']:>3} clients: {r['tok_s']:7.1f} tok/s", flush=True)
    return rows


def merged_gguf(run: Path, out: Path) -> Path:
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "lorasft", "export", str(run), "--out", str(out),
                        "--type", "f16"], check=True)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="bench-out/demo-run", help="a finished run (lorasft train)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per phase")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--servers", nargs="*", default=list(SERVERS), choices=[*SERVERS, "vllm"],
                    help="which to measure (vllm: on a GPU)")  # fmt: skip
    a = ap.parse_args()
    run = Path(a.run)
    if not (run / "adapter_config.json").is_file():
        sys.exit(f"{run}: no finished run; train one: lorasft train output.run_dir={run}")
    binary = find_llama_server()
    if binary is None and set(a.servers) - {"transformers", "vllm"}:
        sys.exit("llama-server is not installed: make llama-server")
    rows: list[dict] = []
    slots = ["--slots", str(a.slots)]
    one = bodies_for(["demo"], a.max_tokens)
    for name, args, bodies in (
        ("transformers", ["--engine", "transformers", "--adapter", f"demo={run}"], one),
        ("vllm", ["--engine", "vllm", *slots, "--adapter", f"demo={run}"], one),
        ("llama.cpp", ["--engine", "llama.cpp", *slots, "--adapter", f"demo={run}"], one),
        ("llama.cpp x2", ["--engine", "llama.cpp", *slots, "--adapter", f"demo={run}",
                          "--adapter", f"demo2={run}"], bodies_for(["demo", "demo2"], a.max_tokens)),
    ):  # fmt: skip
        if name not in a.servers:
            continue
        proc, url = start_server(["lorasft", "serve", *args])
        try:
            rows += measure(name, url, {}, bodies, a.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    bare = []
    if "bare lora" in a.servers:  # the files lorasft serves (cached, or written now)
        from lorasft.model.reopen import read_specs
        from lorasft.serve.llamacpp_engine import base_gguf, lora_gguf, served_config

        spec, runs = read_specs(None, [("demo", str(run))])
        files_ = base_gguf(spec, runs, "f16"), lora_gguf(runs[0], served_config(spec, runs))
        bare.append(("bare lora", files_[0], [files_[1]], [{"lora": [{"id": 0, "scale": 1.0}]}]))
    if "bare merged" in a.servers:
        merged = merged_gguf(run, Path("bench-out/serve/merged-f16.gguf"))
        bare.append(("bare merged", merged, [], None))
    for name, model, lora_files, extra in bare:
        server = LlamaServer(binary, model=model, loras=lora_files, slots=a.slots,
                             ctx_per_slot=8192).start()  # fmt: skip
        try:
            headers = {"Authorization": f"Bearer {server.key}"}
            rows += measure(
                name, server.url, headers, bodies_for(["x"], a.max_tokens, extra), a.seconds
            )
        finally:
            server.stop()
    report(rows, a)


def report(rows: list[dict], a) -> None:
    cpu = cpu_name()
    print(f"\nmachine: {cpu}, {os.cpu_count()} CPUs; run "
          f"{a.run}; greedy chat, max_tokens {a.max_tokens}, streamed; {a.seconds:.0f} s per "
          f"phase; {a.slots} slots")  # fmt: skip
    print(f"{'server':<13} {'clients':>7} {'requests':>8} {'req/s':>6} {'tok/s':>7} {'p50 s':>6} "
          f"{'p95 s':>6} {'TTFT s':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['server']:<13} {r['clients']:>7} {r['requests']:>8} {r['req_s']:>6.2f} "
              f"{r['tok_s']:>7.1f} {r['p50']:>6.2f} {r['p95']:>6.2f} {r['ttft']:>6.2f}")  # fmt: skip
    by = {(r["server"], r["clients"]): r["tok_s"] for r in rows}
    for n in CLIENTS:
        parts = [f"{n} clients:"]
        for num, den in (("llama.cpp", "bare lora"), ("llama.cpp", "transformers"),
                         ("llama.cpp x2", "llama.cpp"), ("bare lora", "bare merged")):  # fmt: skip
            if (num, n) in by and (den, n) in by:
                parts.append(f"{num} / {den} = {by[num, n] / by[den, n]:.2f}")
        print("  ".join(parts))
    if ("llama.cpp", 8) in by and ("llama.cpp", 1) in by:
        print(f"llama.cpp 8 clients / its 1 client: {by['llama.cpp', 8] / by['llama.cpp', 1]:.2f}")


if __name__ == "__main__":
    main()
