"""An outside evaluator against `lorasft serve`: EleutherAI's lm-evaluation-harness scores a
served run, and its figures are compared with lorasft's own on the same records.

1. Generation (`local-chat-completions`, a local task over the run's evaluation records, greedy):
   lm-eval's exact match against `lorasft eval`'s (results.json of the run), record by record.
2. Log-likelihood (`local-completions`, a local multiple-choice task: each evaluation prompt
   rendered with the run's chat template, the right answer and three other records' answers as
   the choices): lm-eval sends the token ids with `echo` and `logprobs`, as for MMLU or HellaSwag;
   lorasft scores the same (context, continuation) pairs itself with the run in transformers
   (one forward pass each), and the choices and log-likelihoods are compared.

lm-eval lives in its own venv (it is not a lorasft dependency):

    python3 -m venv /tmp/lmeval && echo torch==2.13.0 > /tmp/c.txt
    /tmp/lmeval/bin/pip install -c /tmp/c.txt 'lm-eval[api]==0.4.13' transformers
    lorasft train output.dir=/tmp/demo/runs                      # the demo run (6 minutes)
    python bench/serving/lm_eval_serve.py /tmp/demo/runs/demo-* --lm-eval /tmp/lmeval/bin/lm_eval
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from lorasft.data.formats import load_file
from lorasft.data.prepare import data_files
from lorasft.model.reopen import open_run, read_run
from lorasft.serve.process import free_port

# lm-eval task files: the local JSONL (one head for both), then what each task does with it.
TASK_HEAD = """task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
"""
GEN_TASK = """output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: [], max_gen_toks: {max_new}, do_sample: false, temperature: 0}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""
MC_TASK = """output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
"""


def records(run: Path):
    """The run's evaluation records as (messages without the answer, answer)."""
    spec = read_run(run)
    _, eval_files = data_files(spec.cfg.data)
    out = []
    for f in eval_files:
        examples, _, _ = load_file(f, spec.cfg.data.format)
        out += [(ex.messages[:-1], ex.messages[-1]["content"]) for ex in examples]
    return spec, out


def write_tasks(spec, recs, work: Path, max_new: int, seed: int = 0) -> None:
    """The generation task (the user's text) and the multiple-choice task (the prompt rendered
    with the run's template and system prompt; the answer among three others)."""
    from lorasft.data.templates import build_prompt

    rng = random.Random(seed)
    gen, mc = [], []
    answers = [a for _, a in recs]
    for i, (msgs, answer) in enumerate(recs):
        user = "\n".join(m["content"] for m in msgs if m["role"] == "user")
        gen.append({"prompt": user, "answer": answer})
        others = rng.sample([a for j, a in enumerate(answers) if j != i and a != answer], 3)
        label = rng.randrange(4)
        choices = [*others[:label], answer, *others[label:]]
        context = build_prompt(spec.conversation(msgs), spec.tok)
        mc.append({"context": context, "choices": choices, "label": label})
    for name, rows in (("gen", gen), ("mc", mc)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                    for r in rows))  # fmt: skip
    for name, body in (("gen", GEN_TASK.format(max_new=max_new)), ("mc", MC_TASK.format())):
        head = TASK_HEAD.format(name=f"lorasft_{name}", data=work / f"{name}.jsonl")
        (work / f"lorasft_{name}.yaml").write_text(head + body)


def serve(run: Path, port: int, engine: str, log: Path) -> tuple[subprocess.Popen, dict]:
    """`lorasft serve` with the run as adapter `run`; the process and its /health (the engine it
    chose and the weights' type)."""
    cmd = [sys.executable, "-m", "lorasft", "serve", "--adapter", f"run={run}", "--port",
           str(port), "--engine", engine]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"lorasft serve exited ({proc.returncode}); see {log}")
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if health.status_code == 200:
                return proc, health.json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    sys.exit(f"lorasft serve did not become healthy; see {log}")


def lm_eval(binary: str, model: str, args: str, task: str, work: Path, *extra: str) -> Path:
    out = work / f"out-{task}"
    cmd = [binary, "--model", model, "--model_args", args, "--tasks", task, "--include_path",
           str(work), "--output_path", str(out), "--log_samples", *extra]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return next(out.rglob(f"samples_{task}_*.jsonl"))


def read_samples(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["doc_id"])


def own_loglik(model, tok, context: str, continuation: str) -> float:
    """As lm-eval's API models split and send it: the context's trailing whitespace moved to
    the continuation, the whole string's ids, the context's ids, the continuation the ids past
    the context; summed log-probabilities of the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def compare_mc(samples: list[dict], run: Path) -> dict:
    opened = open_run(run)
    rows, agree, lm_right, own_right, diffs = [], 0, 0, 0, []
    for s in samples:
        pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()] if isinstance(
            s["arguments"], dict) else [tuple(a) for a in s["arguments"]]  # fmt: skip
        theirs = [float(r[0][0]) for r in s["resps"]]  # [[loglik, is_greedy]] per choice, as text
        ours = [own_loglik(opened.model, opened.tok, c, x) for c, x in pairs]
        label = int(s["target"])
        pick_t, pick_o = theirs.index(max(theirs)), ours.index(max(ours))
        agree += pick_t == pick_o
        lm_right += pick_t == label
        own_right += pick_o == label
        diffs += [abs(a - b) for a, b in zip(theirs, ours)]
        rows.append({"doc": s["doc_id"], "lm_eval": theirs, "lorasft": ours, "label": label})
    n = len(samples)
    return {"docs": n, "lm_eval_acc": lm_right / n, "lorasft_acc": own_right / n,
            "same_choice": agree / n, "max_abs_loglik_diff": max(diffs),
            "mean_abs_loglik_diff": sum(diffs) / len(diffs), "rows": rows}  # fmt: skip


def compare_gen(samples: list[dict], run: Path) -> dict:
    """lm-eval's answers and exact match beside those of lorasft's own evaluation (the run's
    results.json: transformers, greedy), record by record."""
    ev = json.loads((run / "results.json").read_text())["eval"]
    own = [row["tuned"] for row in ev["samples"]]
    theirs = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else
              s["filtered_resps"] for s in samples]  # fmt: skip
    em = [float(s["exact_match"]) for s in samples]
    same = sum(a.strip() == b.strip() for a, b in zip(theirs, own))
    return {"docs": len(samples), "lm_eval_exact_match": sum(em) / len(em),
            "lorasft_exact_match": ev["tuned"]["generation"]["exact_match"] / 100,
            "same_answer": same / len(samples), "lm_eval_answers": theirs}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--lm-eval", default="lm_eval", help="the lm_eval executable (its own venv)")
    p.add_argument("--engine", default="auto", help="lorasft serve --engine")
    p.add_argument("--work", type=Path, default=Path("bench-out/lm_eval"))
    p.add_argument("--out", type=Path, help="the comparison as JSON")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    spec, recs = records(a.run)
    write_tasks(spec, recs, a.work.resolve(), spec.cfg.eval.max_new_tokens)
    port = free_port()
    server, health = serve(a.run.resolve(), port, a.engine, a.work / "serve.log")
    url = f"http://127.0.0.1:{port}/v1"
    try:
        start = time.perf_counter()
        gen = lm_eval(a.lm_eval, "local-chat-completions",
                      f"model=run,base_url={url}/chat/completions,num_concurrent=1,max_retries=1",
                      "lorasft_gen", a.work, "--apply_chat_template")  # fmt: skip
        mc = lm_eval(a.lm_eval, "local-completions",
                     f"model=run,base_url={url}/completions,num_concurrent=1,max_retries=1,"
                     f"tokenizer={a.run.resolve()},tokenizer_backend=huggingface,"
                     "tokenized_requests=True", "lorasft_mc", a.work)  # fmt: skip
        lm_seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=60)
    out = {"run": str(a.run), "engine": health["engine"], "weights": health.get("weights"),
           "lm_eval_seconds": round(lm_seconds, 1),
           "generation": compare_gen(read_samples(gen), a.run),
           "multiple_choice": compare_mc(read_samples(mc), a.run)}  # fmt: skip
    g, m = out["generation"], out["multiple_choice"]
    print(f"\ngeneration, {g['docs']} records: exact match lm-eval {g['lm_eval_exact_match']:.3f}, "
          f"lorasft eval {g['lorasft_exact_match']:.3f}; same answer {g['same_answer']:.3f}")  # fmt: skip
    print(f"multiple choice, {m['docs']} records: accuracy lm-eval {m['lm_eval_acc']:.3f}, "
          f"lorasft {m['lorasft_acc']:.3f}; same choice {m['same_choice']:.3f}; "
          f"|loglik diff| max {m['max_abs_loglik_diff']:.4f}, mean {m['mean_abs_loglik_diff']:.4f}")  # fmt: skip
    if a.out:
        a.out.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    assert not math.isnan(m["max_abs_loglik_diff"])


if __name__ == "__main__":
    main()
