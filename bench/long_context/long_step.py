"""Measured against planned: peak memory and seconds per training step of the default model at
long lengths, with full attention and with S2-Attn, next to what `lorasft plan` estimates.

Each (length, attention) runs in a fresh process that builds the model exactly as `lorasft train`
does for the given config (context extension, LoRA, trainable embeddings and norms, gradient
checkpointing, the run's precision, S2-Attn while training) and takes `--steps` AdamW steps of
lorasft's loss on one window of real text (bench/long_context/long_corpus.py). Memory: peak RSS of the process
(CPU) or torch.cuda.max_memory_allocated (GPU), with the RSS before the model loaded (Python,
torch, transformers) reported apart. Time: the last step (the first one also pays one-off costs).

    python bench/long_context/long_step.py --lengths 2048 8192 16384 --attention full s2 [--steps 1]
    python bench/long_context/long_step.py --lengths 512 --steps 2   # smoke

`--whole-run`: instead of the bare step, `lorasft train` itself in a fresh process per length and
row (`before`: the whole-vocabulary loss, train.loss_chunk_tokens=0, glibc's moving mmap
threshold and no huge pages, LORASFT_MALLOC_THRESHOLD=0, and evaluation batches bounded by rows
only, as lorasft ran until 2026-12-06; `after`: lorasft's defaults), S2-Attn, one step on the long text, its end-of-run
evaluation included (perplexity of base and tuned over the held-out text's windows of that
length, then the evaluation by length at that length: perplexity, passkey at depth 0.5, the
attention check); peak RSS of that whole process, the step's seconds (results.json) and the
wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = ["context.target_length=16384", "context.method=yarn", "context.trainable=[embed,norm]",
          "lora.target_modules=all-linear", "train.gradient_checkpointing=true",
          "train.batch_size=1", "train.grad_accum=1", "lora.dropout=0"]  # fmt: skip
# lora.dropout=0 as LongLoRA: at these lengths drawing LoRA's dropout masks took 21% of a step
# (profiled at 2048 tokens: aten::bernoulli_ 3.2 s of 15.3 s).


def overrides(length: int, attention: str, extra: list[str]) -> list[str]:
    s2 = ["context.s2_attn=true"] if attention == "s2" else []
    return [*RECIPE, f"data.max_length={length}", *s2, *extra]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(length: int, attention: str, steps: int, extra: list[str], text: Path) -> dict:
    import torch

    from lorasft.config import load_config
    from lorasft.data.tokenize import document_stream
    from lorasft.model.host_memory import release_freed_memory
    from lorasft.model.loss import causal_lm_loss
    from lorasft.model.precision import PRECISION_DTYPES
    from lorasft.model.s2attn import s2_training
    from lorasft.train.setup import prepare_model_and_tokenizer

    release_freed_memory()  # as `lorasft train` does (LORASFT_MALLOC_THRESHOLD=0: glibc's own)
    before = rss_bytes()
    cfg = load_config(None, overrides(length, attention, extra))
    _, precision, tok, model = prepare_model_and_tokenizer(cfg)
    loaded = rss_bytes()
    docs = [json.loads(line)["text"] for line in text.read_text().splitlines()]
    ids = torch.tensor([document_stream(docs, tok)[:length]])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    dtype = PRECISION_DTYPES[precision]
    times = []
    model.train()
    with s2_training(model, cfg.context, length, say=lambda _m: None):
        for _ in range(steps):
            start = time.perf_counter()
            with torch.autocast(device, dtype=dtype, enabled=precision != "fp32"):
                loss, _ = causal_lm_loss(model, batch, None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # fmt: skip
    return {"length": length, "attention": attention, "precision": precision, "device": device,
            "rss_before_model": before, "rss_after_load": loaded, "peak": peak,
            "step_seconds": round(times[-1], 2), "first_step_seconds": round(times[0], 2),
            "loss": round(loss.item(), 4), "trainable": sum(p.numel() for p in params)}  # fmt: skip


WHOLE_RUN_EVAL = ["eval.num_samples=0", "eval.long_windows=1", "eval.passkey_trials=1",
                  "eval.passkey_depths=[0.5]", "train.max_steps=1", "train.eval_strategy=no",
                  "train.early_stopping_patience=null", "train.logging_steps=1"]  # fmt: skip


WHOLE_RUN_ROWS = {"before": (["train.loss_chunk_tokens=0", "eval.batch_tokens=1000000000"],
                              {"LORASFT_MALLOC_THRESHOLD": "0"}),
                  "after": ([], {})}  # fmt: skip


def whole_run_child(length: int, row: str, extra: list[str], corpus: Path) -> dict:
    """`lorasft train` in this process; what it peaked at, including its evaluation."""
    from lorasft.cli import main as lorasft_main
    from lorasft.config import load_config

    eval_file = corpus / f"eval-{length}.jsonl"
    docs = [json.loads(line)["text"] for line in (corpus / "eval.jsonl").read_text().splitlines()]
    text = "\n\n".join(docs)[: 2 * 4 * length]  # about two windows of `length` tokens
    eval_file.write_text(json.dumps({"text": text}) + "\n")
    run_dir = Path(tempfile.mkdtemp(prefix=f"long-run-{length}-{row}-"))
    args = ["train", *overrides(length, "s2", extra), *WHOLE_RUN_ROWS[row][0],
            f"data.train_file={corpus / 'train.jsonl'}", f"data.eval_file={eval_file}",
            f"eval.long_data=[{eval_file}]", f"eval.long_lengths=[{length}]",
            *WHOLE_RUN_EVAL, f"output.run_dir={run_dir}"]  # fmt: skip
    start = time.perf_counter()
    code = lorasft_main(args)
    wall = time.perf_counter() - start
    if code:
        return {"mode": "whole-run", "length": length, "row": row, "exit": code}
    results, cfg = (
        json.loads((run_dir / "results.json").read_text()),
        load_config(run_dir / "config.yaml"),
    )
    return {"mode": "whole-run", "length": length, "attention": "s2", "row": row,
            "chunk": cfg.train.loss_chunk_tokens, "precision": json.loads((run_dir / "lorasft_run.json").read_text())["precision"],
            "exit": code, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_seconds": results["train"]["train_seconds"],
            "eval_seconds": results["eval"].get("seconds"),
            "long_seconds": results.get("long_context", {}).get("seconds"),
            "wall_seconds": round(wall, 1), "train_loss": results["train"]["train_metrics"].get("train_loss"),
            "eval_loss": results["eval"]["tuned"]["perplexity"]["loss"],
            "run_dir": str(run_dir)}  # fmt: skip


def planned(length: int, attention: str, extra: list[str]) -> dict:
    from lorasft.config import load_config
    from lorasft.model.plan import step_plan

    cfg = load_config(None, overrides(length, attention, extra))
    return step_plan(cfg, length)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--attention", nargs="+", default=["full", "s2"], choices=["full", "s2"])
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="more config overrides")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument(
        "--measured",
        type=Path,
        default=None,
        help="print a saved --out file against the plan instead of measuring",
    )
    p.add_argument(
        "--whole-run",
        action="store_true",
        help="lorasft train itself, its evaluation included, per length and --rows",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        default=list(WHOLE_RUN_ROWS),
        choices=list(WHOLE_RUN_ROWS),
        help="--whole-run: before (whole-vocabulary loss, glibc's malloc as it is) and/or after "
        "(lorasft's defaults)",
    )
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--run-child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    corpus = Path(tempfile.gettempdir()) / "lorasft-long-corpus"
    if a.run_child:
        print(json.dumps(whole_run_child(int(a.run_child[0]), a.run_child[1], a.set, corpus)))
        return
    if a.whole_run:
        whole_runs(a, corpus)
        return
    if a.child:
        text = Path(tempfile.gettempdir()) / "lorasft-long-corpus" / "train.jsonl"
        print(json.dumps(child(int(a.child[0]), a.child[1], a.steps, a.set, text)))
        return
    rows = json.loads(a.measured.read_text()) if a.measured else measure(a)
    for row in rows:
        print_row({**row, "plan": planned(row["length"], row["attention"], a.set)})
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))


def measure(a) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).parent))
    from long_corpus import write

    write(Path(tempfile.gettempdir()) / "lorasft-long-corpus")
    rows = []
    for n in a.lengths:
        for att in a.attention:
            cmd = [sys.executable, __file__, "--child", str(n), att, "--steps", str(a.steps),
                   "--set", *a.set]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{n} {att}: the step process failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
            if a.out:
                a.out.write_text(json.dumps(rows, indent=2))
    return rows


def whole_runs(a, corpus: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from long_corpus import write

    write(corpus)
    rows = []
    for n in a.lengths:
        for name in a.rows:
            cmd = [sys.executable, __file__, "--run-child", str(n), name, "--set", *a.set]
            env = {**os.environ, **WHOLE_RUN_ROWS[name][1]}
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                row = {"mode": "whole-run", "length": n, "row": name, "exit": out.returncode}
            else:
                row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print_whole_run(row)
            if a.out:
                a.out.write_text(json.dumps(rows, indent=2))


def print_whole_run(r: dict) -> None:
    if r["exit"]:
        why = " (killed: out of memory)" if r["exit"] == -9 else ""
        print(f"{r['length']:>6} {r['row']:>6}: the run failed, exit {r['exit']}{why}",
              flush=True)  # fmt: skip
        return
    print(f"{r['length']:>6} {r['row']:>6} (chunk {r['chunk']}, {r['precision']}): peak {r['peak'] / 2**30:.2f} GiB (whole "
          f"process, evaluation included), step {r['step_seconds']:.1f}s, eval "
          f"{r['eval_seconds']}s + long {r['long_seconds']}s, wall {r['wall_seconds']:.0f}s, "
          f"train loss {r['train_loss']}, eval loss {r['eval_loss']}", flush=True)  # fmt: skip


def print_row(r: dict) -> None:
    gib, plan = 2**30, r["plan"]
    # CPU: RSS above the process before the model; GPU: max_memory_allocated is the model's alone
    added = r["peak"] - (r["rss_before_model"] if r["device"] == "cpu" else 0)
    print(f"{r['length']:>6} {r['attention']:>4} {r['precision']}: step {r['step_seconds']:.1f}s "
          f"(plan {plan['seconds']:.1f}s), peak {r['peak'] / gib:.2f} GiB, above the bare process "
          f"{added / gib:.2f} GiB (plan {plan['bytes'] / gib:.2f} GiB, "
          f"{100 * (plan['bytes'] - added) / added:+.0f}%)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
