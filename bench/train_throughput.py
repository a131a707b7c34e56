"""Training throughput of lorasft's defaults on the default model (SmolLM2-135M-Instruct).

Prints real (non-padding) tokens/s, supervised tokens/s, padding share and peak memory for a fixed
number of optimizer steps on the demo data. Figures only: never part of the test verdict.

    python bench/train_throughput.py [--steps 12] [--batch-size 8] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from importlib.resources import files
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

from lorasft.config import load_config
from lorasft.data.prepare import prepare
from lorasft.train.run import build_trainer
from lorasft.train.setup import prepare_model_and_tokenizer


class Counter:
    """Wraps the collator to count what each batch really holds."""

    def __init__(self, collate):
        self.collate, self.real, self.supervised, self.computed = collate, 0, 0, 0

    def __call__(self, features):
        batch = self.collate(features)
        self.real += int(batch["attention_mask"].sum())
        self.supervised += int((batch["labels"] != -100).sum())
        self.computed += batch["input_ids"].numel()
        return batch


class Clock(TrainerCallback):
    """Times the steps after the first (warm-up) one, and the tokens they processed."""

    def __init__(self, counter: Counter):
        self.counter, self.start, self.at_start = counter, None, (0, 0, 0)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1:
            self.start = time.perf_counter()
            c = self.counter
            self.at_start = (c.real, c.supervised, c.computed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("overrides", nargs="*", help="section.key=value on top of the demo config")
    a = ap.parse_args()
    demo = str(files("lorasft") / "assets" / "demo.yaml")
    cfg = load_config(demo, [f"train.max_steps={a.steps}", f"train.batch_size={a.batch_size}",
                             "train.eval_strategy=no", "train.early_stopping_patience=null",
                             "train.save_steps=100000", "output.run_dir=/tmp/lorasft-bench",
                             *a.overrides])  # fmt: skip
    set_seed(0)
    _, precision, tok, model = prepare_model_and_tokenizer(cfg)
    data = prepare(cfg.data, tok)
    trainer = build_trainer(cfg, model, tok, data, Path(cfg.output.run_dir), precision)
    counter = Counter(trainer.data_collator)
    trainer.data_collator = counter
    clock = Clock(counter)
    trainer.add_callback(clock)
    trainer.train()
    seconds = time.perf_counter() - clock.start
    real, sup, comp = (now - then for now, then in
                       zip((counter.real, counter.supervised, counter.computed), clock.at_start))  # fmt: skip
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"config: precision {precision}, lora {cfg.lora.target_modules} r={cfg.lora.r}, "
          f"batch {cfg.train.batch_size}, {a.steps - 1} timed steps, padding per batch, "
          f"length-grouped {cfg.train.group_by_length}")
    print(f"real tokens/s:       {real / seconds:8.1f}")
    print(f"supervised tokens/s: {sup / seconds:8.1f}")
    print(f"padding share:       {1 - real / comp:8.1%}  (computed {comp}, real {real})")
    print(f"seconds per step:    {seconds / (a.steps - 1):8.2f}")
    print(f"peak memory (RSS):   {peak_mib:8.0f} MiB")


if __name__ == "__main__":
    main()
