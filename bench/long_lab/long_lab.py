"""Context extension reproduced in miniature: two small models pretrained here from scratch at a
short window W, extended to 4W by every method lorasft has, scored untrained and after a short
fine-tune at 4W run by `lorasft train` itself.

- Text (nothing downloaded): the Python standard library's own source on this machine. Nine
  files in ten pretrain the models (and their BPE tokenizer); the tenth file of each ten is held
  out for the fine-tune at 4W. Perplexity is measured on **another domain**: the language
  reference topics every CPython carries (`pydoc_data`: English prose, never in the pretraining
  or fine-tuning text), joined with EOS in a fixed order.
- Models: `rope` (Llama architecture: RoPE, RMSNorm, SwiGLU) and `learned` (GPT-2 architecture: a
  learned absolute position table of W rows), 4 layers of width 128 (about 1.3M parameters each),
  pretrained for 1,500 steps of 64 windows of W = 64 tokens (6.1M tokens, about 3 passes over the
  text). W is small because a model this size only learns to use its context, and so to depend
  on its positions, after that much training: trained 4x less, the rope model read 4W with
  plain extrapolation only 3% worse than W (nothing for any method to fix).
- Methods: RoPE none (plain extrapolation), linear (position interpolation), dynamic (NTK), yarn,
  llama3; learned tables interpolate, copy, random; all applied by lorasft's `context:` section.
  Fine-tune: `lorasft train` with LoRA on every linear layer plus trainable embeddings and norms
  (LongLoRA), the new position rows trained in full, the same steps and tokens for every method;
  yarn also with S2-Attn (`yarn+s2`).
- Score: perplexity of the same final W/2 tokens at each of `--ends` end points, read with W, 2W
  and 4W tokens of context (lorasft's `same_tokens_perplexity`), so a lower value at a longer
  length means the model used the extra context.

Writes `--out FILE.json` (rows `{"model", "method", "trained", "window", "length", "ppl"}` plus the
run's settings and timings), prints the table and the papers' three expectations checked, and
draws `--plot` (default: the JSON's name with .png).

    python bench/long_lab/long_lab.py --out lab.json              # about 30 minutes on 2 CPU cores
    python bench/long_lab/long_lab.py --out /tmp/lab.json --quick # smoke test, about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from lorasft.config import ContextSection
from lorasft.data.tokenize import document_stream
from lorasft.eval.long_models import position_limit
from lorasft.eval.sliding import same_tokens_perplexity
from lorasft.model.context import ROPE_METHODS, TABLE_METHODS, apply_context
from lorasft.model.load import load_model, load_tokenizer
from lorasft.model.reopen import open_run

EOS = "<|endoftext|>"
# Parts of the standard library that are not ordinary source: tests, data tables, the topics
# used for evaluation, vendored or demo code.
SKIP = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__",
        "ensurepip", "encodings", "pydoc_data"}  # fmt: skip
SHAPE = {"hidden": 128, "layers": 4, "heads": 2}


def source_documents() -> tuple[list[str], list[str]]:
    """(pretraining, fine-tuning) documents: the standard library's source files, one in ten
    held out for the fine-tune."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not set(p.relative_to(root).parts) & SKIP and not p.name.startswith("config-"))  # fmt: skip
    texts = [p.read_text(encoding="utf-8", errors="replace").strip() for p in files]
    pretrain = [t for i, t in enumerate(texts) if i % 10 != 5 and t]
    tune = [t for i, t in enumerate(texts) if i % 10 == 5 and t]
    return pretrain, tune


def reference_documents() -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def train_tokenizer(docs: list[str], vocab: int, out: Path):
    """A byte-level BPE tokenizer of `vocab` ids learnt from `docs`, EOS its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator(docs, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=EOS).save_pretrained(out)
    return load_tokenizer(out)


def model_config(kind: str, vocab: int, window: int, eos: int):
    from transformers import GPT2Config, LlamaConfig

    h, n, heads = SHAPE["hidden"], SHAPE["layers"], SHAPE["heads"]
    if kind == "rope":
        return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=h * 8 // 3 // 32 * 32,
                           num_hidden_layers=n, num_attention_heads=heads,
                           num_key_value_heads=heads, max_position_embeddings=window,
                           rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=eos,
                           eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    return GPT2Config(vocab_size=vocab, n_embd=h, n_layer=n, n_head=heads, n_positions=window,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos,
                      eos_token_id=eos, pad_token_id=eos)  # fmt: skip


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def pretrain(kind: str, tok, stream: list[int], window: int, steps: int, batch: int,
             out: Path, peak: float = 3e-3, seed: int = 0) -> dict:  # fmt: skip
    """Train a model of `kind` from scratch on random windows of `stream`; save it to `out`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(kind, len(tok), window, tok.eos_token_id),
                                             attn_implementation="sdpa")  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=0.1)
    data, gen = torch.tensor(stream), torch.Generator().manual_seed(seed)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, peak, max(1, steps // 20))
        begin = torch.randint(0, len(data) - window, (batch,), generator=gen)
        x = torch.stack([data[b : b + window] for b in begin.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            recent = sum(losses[-20:]) / len(losses[-20:])
            print(f"  pretrain {kind} step {step + 1}/{steps}: loss {recent:.3f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)  # fmt: skip
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"steps": steps, "batch": batch, "tokens": steps * batch * window,
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def score(model, ids: list[int], lengths: list[int], a) -> dict[int, float]:
    """Perplexity of the same final tokens at each length the model can read."""
    limit = position_limit(model)  # a learned table stops at its last row
    fits = [n for n in lengths if limit is None or n <= limit]
    res = same_tokens_perplexity(model, ids, fits, a.window // 2, a.ends, max(lengths))
    return {n: res[str(n)]["perplexity"] for n in fits}


def untrained(folder: Path, kind: str, method: str | None, ids: list[int], lengths: list[int], a):
    """The pretrained model, extended by `method` with no training (None: as pretrained)."""
    model = load_model(folder, dtype=torch.float32)
    if method is not None:
        apply_context(model, ContextSection(target_length=a.factor * a.window, method=method))
    return score(model.eval(), ids, lengths, a)


def tune_config(folder: Path, data: Path, method: str, s2: bool, out: Path, a) -> str:
    target = a.factor * a.window
    return f"""# written by bench/long_lab/long_lab.py
model: {{path: {folder}}}
data: {{train_file: {data}, format: text, max_length: {target}, val_ratio: 0}}
context: {{target_length: {target}, method: {method}, trainable: [embed, norm], s2_attn: {str(s2).lower()}}}
lora: {{target_modules: all-linear, r: 16, alpha: 32, dropout: 0.0}}
train: {{max_steps: {a.tune_steps}, batch_size: {a.tune_batch}, learning_rate: {a.tune_lr},
        lr_scheduler: constant, warmup_ratio: 0.0, eval_strategy: "no", save_total_limit: 1,
        early_stopping_patience: null, load_best_model_at_end: false, logging_steps: 10}}
eval: {{num_samples: 0, compare_base: false, long: false}}
output: {{dir: {out}, name: {method}{"-s2" if s2 else ""}}}
"""


def fine_tune(folder: Path, data: Path, method: str, s2: bool, work: Path, a) -> tuple[Path, float]:
    """Run `lorasft train` on the held-out source at 4W; the run folder and its wall time."""
    out = work / f"runs-{folder.name}"
    cfg = work / f"{folder.name}-{method}{'-s2' if s2 else ''}.yaml"
    cfg.write_text(tune_config(folder, data, method, s2, out, a))
    before = set(out.glob("*")) if out.exists() else set()
    start, log = time.perf_counter(), cfg.with_suffix(".log")
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "lorasft", "train", str(cfg)], check=False,
                              stdout=f,
                              stderr=subprocess.STDOUT)  # fmt: skip
    if done.returncode:
        sys.exit(f"lorasft train {cfg} failed (exit {done.returncode}); its output: {log}")
    (run,) = set(out.glob("*")) - before
    return run, time.perf_counter() - start


def rows_of(kind: str, method: str, trained: bool, ppl: dict[int, float], a) -> list[dict]:
    return [{"model": kind, "method": method, "trained": trained, "window": a.window,
             "length": n, "ppl": p} for n, p in ppl.items()]  # fmt: skip


def lab(a, work: Path) -> tuple[list[dict], dict]:
    pretrain_docs, tune_docs = source_documents()
    t0 = time.perf_counter()
    tok = train_tokenizer(pretrain_docs, a.vocab, work / "tokenizer")
    stream = document_stream(pretrain_docs, tok)
    eval_ids = document_stream(reference_documents(), tok)
    tune_file = work / "tune.jsonl"
    tune_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in tune_docs))
    tune_tokens = len(document_stream(tune_docs, tok))
    info = {"tokenizer_seconds": round(time.perf_counter() - t0, 1), "pretrain_tokens": len(stream),
            "tune_tokens": tune_tokens, "eval_tokens": len(eval_ids), "models": {}}  # fmt: skip
    print(f"text: {len(stream):,} pretraining tokens, {tune_tokens:,} fine-tuning tokens (held-out "
          f"source), {len(eval_ids):,} evaluation tokens (language reference)", flush=True)  # fmt: skip
    lengths = [a.window * k for k in (1, 2, 4) if k <= a.factor] + [a.window * a.factor]
    lengths = sorted(set(lengths))
    rows: list[dict] = []
    for kind, methods in (("rope", ROPE_METHODS), ("learned", TABLE_METHODS)):
        folder = work / kind
        info["models"][kind] = pretrain(
            kind, tok, stream, a.window, a.pretrain_steps, a.batch, folder, peak=a.lr
        )
        if kind == "learned":  # the table as pretrained reads W positions and no more
            rows += rows_of(
                kind, "none", False, untrained(folder, kind, None, eval_ids, lengths, a), a
            )
        for method in methods:
            ppl = untrained(folder, kind, method, eval_ids, lengths, a)
            rows += rows_of(kind, method, False, ppl, a)
            print(f"  {kind} {method:11s} untrained: {fmt(ppl)}", flush=True)
        runs = [(m, False) for m in methods] + ([("yarn", True)] if kind == "rope" else [])
        for method, s2 in runs:
            run, wall = fine_tune(folder, tune_file, method, s2, work, a)
            opened = open_run(run)
            ppl = score(opened.model, eval_ids, lengths, a)
            name = method + ("+s2" if s2 else "")
            rows += rows_of(kind, name, True, ppl, a)
            info["models"][kind].setdefault("tune_seconds", {})[name] = round(wall, 1)
            print(f"  {kind} {name:11s} trained:   {fmt(ppl)}  ({wall:.0f}s)", flush=True)
            del opened
    return rows, info


def fmt(ppl: dict[int, float]) -> str:
    return "  ".join(f"{n}: {p:8.2f}" for n, p in ppl.items())


def table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    keyed = {(r["model"], r["method"], r["trained"], r["length"]): r["ppl"] for r in rows}
    out = ["| model | method | trained | " + " | ".join(f"ppl @ {n}" for n in lengths) + " |",
           "|---|---|---|" + "---|" * len(lengths)]  # fmt: skip
    for model, method, trained in dict.fromkeys(
        (r["model"], r["method"], r["trained"]) for r in rows
    ):
        cells = [keyed.get((model, method, trained, n)) for n in lengths]
        out.append(f"| {model} | {method} | {'yes' if trained else 'no'} | "
                   + " | ".join(f"{c:.2f}" if c else "—" for c in cells) + " |")  # fmt: skip
    return "\n".join(out)


def expectations(rows: list[dict], window: int) -> list[tuple[str, bool, str]]:
    """The papers' three expectations, each with whether the rows show it and the figures."""
    ppl = {(r["model"], r["method"], r["trained"], r["length"]): r["ppl"] for r in rows}
    longest = max(r["length"] for r in rows)
    out = []
    if ("rope", "none", False, longest) in ppl:
        w, far = ppl["rope", "none", False, window], ppl["rope", "none", False, longest]
        out.append((f"plain extrapolation, untrained: ppl@{longest} >= 2 x ppl@{window}",
                    far >= 2 * w, f"{far:.2f} vs {w:.2f} ({far / w:.1f}x)"))  # fmt: skip
    for kind, pi in (("rope", "linear"), ("learned", "interpolate")):
        base = ppl.get((kind, "none", False, window))
        if base and (kind, pi, False, window) in ppl:
            v = ppl[kind, pi, False, window]
            claim = (f"{kind}: {pi} untrained hurts inside the window (ppl@{window} above the "
                     "model as pretrained)")  # fmt: skip
            out.append((claim, v > base, f"{v:.2f} vs {base:.2f}"))
    for kind in ("rope", "learned"):
        tuned = {m: p for (k, m, t, n), p in ppl.items() if k == kind and t and n == longest}
        if tuned:
            best = min(tuned, key=tuned.get)
            w = ppl[kind, best, True, window]
            claim = (f"{kind}: after fine-tuning, the best method at {longest} ({best}) is no "
                     f"higher there than at {window}")  # fmt: skip
            out.append((claim, tuned[best] <= w, f"{tuned[best]:.2f} vs {w:.2f}"))
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("rope", "learned") if any(r["model"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        mine = [r for r in rows if r["model"] == kind]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        for method in methods:
            for trained in (False, True):
                pts = sorted((r["length"], r["ppl"]) for r in mine
                             if r["method"] == method and r["trained"] == trained)  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colours[method],
                            linestyle="-" if trained else ":",
                            label=f"{method} ({'tuned' if trained else 'untrained'})")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["length"] for r in mine}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("tokens of context (same scored tokens)")
        ax.set_ylabel("perplexity, other domain")
        ax.set_title(f"{kind}: window {mine[0]['window']}")
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(0, -0.15))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next(
            x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the rows, as JSON")
    p.add_argument("--plot", type=Path, help="default: --out with .png")
    p.add_argument("--work", type=Path, help="models and runs (default: beside --out)")
    p.add_argument("--window", type=int, default=64, help="W: the pretraining window")
    p.add_argument("--factor", type=int, default=4, help="extend to factor x W")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64, help="pretraining windows per step")
    p.add_argument("--lr", type=float, default=5e-3, help="pretraining peak learning rate")
    p.add_argument("--tune-steps", type=int, default=60)
    p.add_argument("--tune-batch", type=int, default=16, help="fine-tuning windows of factor x W")
    p.add_argument("--tune-lr", type=float, default=2e-3)
    p.add_argument("--ends", type=int, default=192, help="end points scored (W/2 tokens each)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny window, few steps")
    a = p.parse_args()
    if a.quick:
        a.window, a.pretrain_steps, a.batch, a.tune_steps, a.tune_batch, a.ends = 32, 30, 8, 3, 2, 8
    work = a.work or a.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, info = lab(a, work)
    wall = time.perf_counter() - start
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads"
    checks = expectations(rows, a.window)
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "plot", "work")}
    a.out.write_text(json.dumps({"rows": rows, "settings": settings, "info": info,
                                 "expectations": [{"claim": c, "holds": h, "figures": f}
                                                  for c, h, f in checks],
                                 "seconds": round(wall, 1), "machine": machine,
                                 "python": platform.python_version(), "torch": torch.__version__,
                                 "date": time.strftime("%Y-%m-%d")}, indent=1))  # fmt: skip
    plot_path = a.plot or a.out.with_suffix(".png")
    plot(rows, plot_path, f"lorasft long_lab: W={a.window} -> {a.factor * a.window}, "
         f"{time.strftime('%Y-%m-%d')}, {machine}")  # fmt: skip
    print("\n" + table(rows) + "\n")
    for claim, holds, figures in checks:
        print(f"{'yes' if holds else 'NO '}  {claim}: {figures}")
    print(f"\n{a.out}, {plot_path}; {wall:.0f} s wall")


if __name__ == "__main__":
    main()
