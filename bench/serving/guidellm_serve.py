"""A load generator against `lorasft serve`: guidellm (vLLM's benchmark tool) sends streamed chat
requests with `max_completion_tokens` and `ignore_eos`, as it does to vLLM, at several output
lengths and concurrencies; every request's token counts are checked against what was asked for
and against lorasft's own count of the prompt (the run's template and system prompt).

guidellm lives in its own venv (not a lorasft dependency):

    python3 -m venv /tmp/guidellm && echo torch==2.13.0 > /tmp/c.txt
    /tmp/guidellm/bin/pip install -c /tmp/c.txt guidellm          # 0.8.1 measured
    python bench/serving/guidellm_serve.py RUN_DIR --guidellm /tmp/guidellm/bin/guidellm --out g.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lm_eval_serve import serve

from lorasft.data.tokenize import prompt_ids
from lorasft.model.reopen import read_run
from lorasft.serve.process import free_port


def run_guidellm(binary: str, url: str, run: Path, profile: str, prompt: int, output: int,
                 requests: int, out: Path) -> dict:  # fmt: skip
    cmd = [binary, "run", "--backend", f"kind=openai_http,target={url},model=run",
           "--profile", profile, "--data",
           f"kind=synthetic_text,prompt_tokens={prompt},output_tokens={output}",
           "--constraint", f"kind=max_requests,count={requests}",
           "--tokenizer", f"kind=huggingface_auto,model={run}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def check(report: dict, spec) -> dict:
    """Each request: asked (max_completion_tokens) vs generated, and the prompt tokens the server
    reported vs lorasft's own count of the same messages."""
    bench = report["benchmarks"][0]
    done = bench["requests"]["successful"]
    asked, got, same_prompt, ttft, tps = [], [], 0, [], []
    for r in done:
        body = json.loads(r["request_args"])["body"]
        messages = [{"role": m["role"], "content": "".join(p["text"] for p in m["content"])
                     if isinstance(m["content"], list) else m["content"]}
                    for m in body["messages"]]  # fmt: skip
        own = len(prompt_ids(spec.conversation(messages), spec.tok))
        same_prompt += own == r["prompt_tokens"]
        asked.append(body["max_completion_tokens"])
        got.append(r["output_tokens"])
        ttft.append(r["time_to_first_token_ms"])
        tps.append(r["output_tokens_per_second"])
    return {"requests": len(done), "errored": len(bench["requests"]["errored"]),
            "incomplete": len(bench["requests"]["incomplete"]),
            "asked": sorted(set(asked)), "all_lengths_as_asked": asked == got,
            "output_tokens": [min(got), max(got)] if got else None,
            "prompt_tokens_as_lorasft_counts": same_prompt,
            "ttft_ms_median": round(statistics.median(ttft), 1),
            "output_tok_s_per_request_median": round(statistics.median(tps), 1),
            "duration_s": round(bench["duration"], 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--guidellm", default="guidellm")
    p.add_argument("--engine", default="auto")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--outputs", type=int, nargs="+", default=[16, 64])
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--work", type=Path, default=Path("bench-out/guidellm"))
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    spec = read_run(a.run)
    port = free_port()
    server, health = serve(a.run.resolve(), port, a.engine, a.work / "serve.log")
    rows = []
    try:
        for output in a.outputs:
            for name, profile in (("synchronous", "kind=synchronous"),
                                  ("4 concurrent", "kind=concurrent,streams=4")):  # fmt: skip
                report = run_guidellm(a.guidellm, f"http://127.0.0.1:{port}", a.run.resolve(),
                                      profile, a.prompt_tokens, output, a.requests,
                                      a.work / f"{output}-{name.split()[0]}.json")  # fmt: skip
                row = {"profile": name, "output_tokens_asked": output, **check(report, spec)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        server.terminate()
        server.wait(timeout=60)
    out = {"run": str(a.run), "engine": health["engine"], "weights": health.get("weights"),
           "prompt_tokens": a.prompt_tokens, "rows": rows}  # fmt: skip
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))
    bad = [r for r in rows if not r["all_lengths_as_asked"] or r["errored"] or
           r["prompt_tokens_as_lorasft_counts"] != r["requests"]]  # fmt: skip
    print("every request as asked" if not bad else f"MISMATCH in {len(bad)} row(s)")


if __name__ == "__main__":
    main()
