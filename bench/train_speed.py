"""Training speed on the default model: a naive pad-to-max_length pipeline vs lorasft's defaults.

Each mode runs in its own subprocess (so peak memory is its own) for a fixed number of optimizer
steps on the demo records, LoRA r=8 on q_proj/v_proj, batch 8, fp32 base unless overridden:
- naive:   plain transformers Trainer, every record padded to max_length (512), full logits
- lorasft: lorasft's defaults (padding per batch, length-grouped batches, logits only where the
           loss is taken)
- packed:  lorasft with data.packing=true
- compiled: lorasft with train.torch_compile=true (not in the default modes: compiling takes minutes)
- trl:     TRL's SFTTrainer (prompt-completion data, dynamic padding), when trl is installed
Prints real (non-padding) tokens/s, supervised tokens/s, padding share, peak RSS, an approximate
MFU against an fp32 matmul peak measured in the same run, and the ratios. Figures only.

    python bench/train_speed.py [--steps 8] [--modes naive,lorasft,packed]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

HERE = Path(__file__).resolve()


class Counter:
    """Wraps a collator to count what each batch really holds."""

    def __init__(self, collate):
        self.collate, self.real, self.supervised, self.computed = collate, 0, 0, 0

    def __call__(self, features):
        batch = self.collate(features)
        # Real tokens from the records themselves: packed batches carry no attention mask, and
        # the naive pipeline's records arrive already padded (their mask says what is real).
        self.real += sum(sum(f["attention_mask"]) if "attention_mask" in f else len(f["input_ids"])
                         for f in features)  # fmt: skip
        self.supervised += int((batch["labels"][:, 1:] != -100).sum())
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


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def lorasft_trainer(steps: int, extra: list[str]):
    from lorasft.config import load_config
    from lorasft.data.prepare import prepare
    from lorasft.train.run import build_trainer
    from lorasft.train.setup import prepare_model_and_tokenizer

    demo = str(files("lorasft") / "assets" / "demo.yaml")
    cfg = load_config(demo, [f"train.max_steps={steps}", "train.batch_size=8", "lora.r=8",
                             "lora.target_modules=[q_proj,v_proj]", "train.eval_strategy=no",
                             "train.early_stopping_patience=null", "train.save_steps=100000",
                             "output.run_dir=/tmp/lorasft-bench", *extra])  # fmt: skip
    _, precision, tok, model = prepare_model_and_tokenizer(cfg)
    data = prepare(cfg.data, tok)
    return build_trainer(cfg, model, tok, data, Path(cfg.output.run_dir), precision)


def naive_trainer(steps: int, max_length: int = 512):
    """The common tutorial pipeline: tokenize with padding="max_length", labels = input_ids with
    padding masked, the model's own loss over every position."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    from lorasft.data.formats import load_file
    from lorasft.data.prepare import demo_files
    from lorasft.model.load import resolve_model_path

    path = resolve_model_path("default")
    tok = AutoTokenizer.from_pretrained(path)
    examples, _, _ = load_file(demo_files()[0])
    texts = [tok.apply_chat_template(e.messages, tokenize=False) for e in examples]
    enc = tok(
        texts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=False,
    )
    rows = [{"input_ids": i, "attention_mask": m, "labels": [t if k else -100 for t, k in zip(i, m)]}
            for i, m in zip(enc["input_ids"], enc["attention_mask"])]  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))  # fmt: skip
    args = TrainingArguments(output_dir="/tmp/naive-bench", max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=2e-4, report_to=[], save_strategy="no", disable_tqdm=True)  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                   data_collator=default_data_collator)  # fmt: skip


def trl_trainer(steps: int):
    """TRL's SFTTrainer with its defaults for prompt-completion data (dynamic padding, loss on
    the completion), the same LoRA and batch; only when trl is installed."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lorasft.data.formats import load_file
    from lorasft.data.prepare import demo_files
    from lorasft.model.load import resolve_model_path

    path = resolve_model_path("default")
    examples, _, _ = load_file(demo_files()[0])
    rows = [{"prompt": e.messages[:-1], "completion": e.messages[-1:]} for e in examples]
    for row in rows:  # TRL's templates take role/content only
        row["prompt"] = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
    args = SFTConfig(output_dir="/tmp/trl-bench", max_steps=steps, per_device_train_batch_size=8,
                     bf16=False,  # fp32 like the other modes (TRL defaults to bf16)
                     learning_rate=2e-4, max_length=512, report_to=[], save_strategy="no",
                     disable_tqdm=True)  # fmt: skip
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
    )


def run_mode(mode: str, steps: int) -> dict:
    set_seed(0)
    trainer = {"naive": lambda: naive_trainer(steps), "lorasft": lambda: lorasft_trainer(steps, []),
               "packed": lambda: lorasft_trainer(steps, ["data.packing=true"]),
               "compiled": lambda: lorasft_trainer(steps, ["train.torch_compile=true"]),
               "trl": lambda: trl_trainer(steps)}[mode]()  # fmt: skip
    counter = Counter(trainer.data_collator)
    trainer.data_collator = counter
    clock = Clock(counter)
    trainer.add_callback(clock)
    trainer.train()
    seconds = time.perf_counter() - clock.start
    real, sup, comp = (
        n - s for n, s in zip((counter.real, counter.supervised, counter.computed), clock.at_start)
    )
    params = sum(p.numel() for p in trainer.model.parameters())
    head = trainer.model.get_input_embeddings().weight.numel()  # tied with the output head
    return {"mode": mode, "seconds_per_step": seconds / (steps - 1), "real_tps": real / seconds,
            "supervised_tps": sup / seconds, "padding_share": 1 - real / comp,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            # Useful FLOPs, approximately: forward 2N + backward through the frozen weights 2N per
            # real token for the body, and the same for the head at the positions in the loss.
            "gflops": (4 * (params - head) * real + 4 * head * sup) / seconds / 1e9}  # fmt: skip


def _has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--modes", default="naive,lorasft,packed" + (",trl" if _has_trl() else ""))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(run_mode(a.child, a.steps)))
        return
    peak = matmul_peak_gflops()
    results = []
    for mode in a.modes.split(","):
        out = subprocess.run([sys.executable, str(HERE), "--child", mode, "--steps", str(a.steps)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, fp32 matmul peak {peak:.1f} GFLOP/s"
    )
    print(
        f"{'mode':8} {'real tok/s':>10} {'sup tok/s':>10} {'pad %':>6} {'s/step':>7} {'peak MiB':>9} {'~MFU %':>7}"
    )
    for r in results:
        print(
            f"{r['mode']:8} {r['real_tps']:10.1f} {r['supervised_tps']:10.1f} {100 * r['padding_share']:6.1f} "
            f"{r['seconds_per_step']:7.2f} {r['peak_rss_mib']:9.0f} {100 * r['gflops'] / peak:7.1f}"
        )
    by = {r["mode"]: r for r in results}
    for ref in ("naive", "trl"):
        for r in results:
            if ref in by and r["mode"] not in (ref, "naive", "trl"):
                print(
                    f"{r['mode']} / {ref}: {r['real_tps'] / by[ref]['real_tps']:.1f}x real tokens/s"
                )


if __name__ == "__main__":
    main()
