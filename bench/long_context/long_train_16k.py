"""The default model (SmolLM2-135M-Instruct, window 8192) taken to 16384 tokens by training, then
measured before and after with lorasft's own evaluation by length.

Recipe: YaRN (factor 2), LoRA on every linear layer plus trainable embeddings and norms
(LongLoRA's "LoRA+"), S2-Attn with groups of a quarter of the length, LoRA dropout 0, a length
curriculum of two stages (12288, then 16384 tokens) on real long text built on this machine
(bench/long_context/long_corpus.py), one sequence per step, a constant learning rate of 2e-4 from the first
step (LoRA's B starts at zero, so there is nothing to protect with a warm-up).

Training text (`--train-text source`, the default): the Python source code of 55 standard-library
modules (703k tokens); evaluation text: the Python language reference topics (`pydoc_data`,
English prose). Code against prose, so a gain the same at 2k as at 16k is the text's domain and
the report card's control ratio shows what the extension added. Evaluation (after training,
`eval.long_*`): perplexity of the same final 512 tokens at 2 end points read with 2k, 4k, 8k and
16k tokens of context, for the base without scaling, the base with YaRN untrained (before) and
the tuned run (after); passkey retrieval with 50 trials at 16k (5 depths x 10) before and after,
and 50 for the base inside its own window (8192), the report card's reference.

Resumable: it runs `lorasft train CONFIG train.resume=auto`, so running it again after an
interruption continues from the newest checkpoint of the unfinished stage (a checkpoint every
step), or re-runs only the evaluation when training had finished.

    python bench/long_context/long_train_16k.py                   # many hours on a 2-core CPU: run it again
                                                     # after an interruption to go on
    python bench/long_context/long_train_16k.py --out /tmp/smoke --steps 1 1 --stage-lengths 256 512 \
        --lengths 256 512 --trials 1        # smoke test, minutes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from long_corpus import write

from lorasft.eval.long_card import card_lines


def config_text(data: Path, steps: list[int], lengths: list[int], stage_lengths: list[int],
                trials: int, target: int, passkey_lengths: list[int],
                before: bool = True) -> str:  # fmt: skip
    stages = "\n".join(
        f"  - {{name: long-{n}, data: {{train_file: {data / 'train.jsonl'}, format: text, "
        f"max_length: {n}, val_ratio: 0}}, train: {{max_steps: {k}, batch_size: 1, grad_accum: 1}}}}"
        for n, k in zip(stage_lengths, steps)
    )
    return f"""# written by bench/long_context/long_train_16k.py
context: {{target_length: {target}, method: yarn, trainable: [embed, norm], s2_attn: true, s2_group: 0.25}}
lora: {{target_modules: all-linear, r: 8, alpha: 16, dropout: 0.0}}
train: {{learning_rate: 2.0e-4, lr_scheduler: constant, warmup_ratio: 0.0, save_steps: 1,
        save_total_limit: 1, eval_strategy: no, early_stopping_patience: null,
        load_best_model_at_end: false, logging_steps: 1, gradient_checkpointing: true}}
eval: {{num_samples: 0, compare_base: false, long_data: [{data / "eval.jsonl"}],
       long_lengths: {lengths}, long_windows: 2, long_scored: 512, passkey_trials: {trials},
       passkey_lengths: {passkey_lengths}, passkey_before: {str(before).lower()}}}
output: {{dir: {data.parent / "runs"}, name: long16k}}
stages:
{stages}
"""


def table(results: dict, wall: float) -> str:
    lc, tr = results["long_context"], results["train"]
    lengths = lc["lengths"]
    out = ["| model | " + " | ".join(f"ppl @ {n}" for n in lengths) + " |",
           "|---|" + "---|" * len(lengths)]  # fmt: skip
    for name, row in lc["perplexity"].items():
        cells = [f"{row[str(n)]['perplexity']:.2f}" if row[str(n)].get("perplexity") else "—"
                 for n in lengths]  # fmt: skip
        out.append(f"| {lc['labels'][name]} | " + " | ".join(cells) + " |")
    out += ["", "| passkey (trials per length) | "
            + " | ".join(str(n) for n in lc["passkey"]["lengths"]) + " |",
            "|---|" + "---|" * len(lc["passkey"]["lengths"])]  # fmt: skip
    for label, grid in (("before: base + YaRN, untrained", lc.get("passkey_base")),
                        ("after: tuned run", lc["passkey"])):  # fmt: skip
        if grid:
            n = grid["trials"] * len(grid["depths"])
            cells = [f"{sum(r) / len(r):.0%} of {n}" for r in grid["accuracy"]]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", *card_lines(lc["card"]), ""]
    for st in tr.get("stages", []):
        seen = st.get("train_metrics", {}).get("num_input_tokens_seen")
        out.append(f"- stage {st['stage']}: {st['global_step']} steps, {seen or '?'} tokens, "
                   f"{st['train_seconds']:.0f} s training")  # fmt: skip
    out.append(f"- evaluation by length: {lc['seconds']:.0f} s; this invocation: {wall:.0f} s wall")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out/long16k"))
    p.add_argument("--steps", type=int, nargs=2, default=[8, 40], help="steps of the two stages")
    p.add_argument("--stage-lengths", type=int, nargs=2, default=[12288, 16384])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument(
        "--trials",
        type=int,
        default=10,
        help="passkey trials per length and depth (5 depths: 50 per length)",
    )
    p.add_argument(
        "--passkey-lengths",
        type=int,
        nargs="+",
        default=[16384],
        help="passkey lengths (the base is also tried at its own window, 8192)",
    )
    p.add_argument(
        "--train-text",
        choices=["source", "pydoc"],
        default="source",
        help="source: the modules' Python source (code; evaluation is prose); pydoc: "
        "their rendered documentation (the run of 2026-11-28)",
    )
    p.add_argument("--target", type=int, default=16384, help="context.target_length")
    p.add_argument(
        "--passkey-before",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="passkey also for the base with YaRN untrained (as costly as the tuned run's grid)",
    )
    a = p.parse_args()
    data = a.out / "data"
    write(data, a.train_text)
    cfg = a.out / "long16k.yaml"
    cfg.write_text(
        config_text(
            data.resolve(),
            a.steps,
            a.lengths,
            a.stage_lengths,
            a.trials,
            a.target,
            a.passkey_lengths,
            a.passkey_before,
        )
    )
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "lorasft", "train", str(cfg), "train.resume=auto"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    runs = sorted((a.out / "runs").glob("long16k-*"))
    results = json.loads((runs[-1] / "results.json").read_text())
    print(f"\nrun: {runs[-1]}\n")
    print(table(results, time.perf_counter() - start))


if __name__ == "__main__":
    main()
