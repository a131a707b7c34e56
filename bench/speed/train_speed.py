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
MFU against a matmul peak measured in the same run (fp32 on CPU), held-out response-token loss
after training, and the ratios. Figures only.

    python bench/speed/train_speed.py [--steps 8] [--modes naive,lorasft,packed] [--device cpu|cuda]
                                [--pad-multiple 64]   (lorasft/compiled batches: fewer shapes)

On a GPU (--device cuda, the default where torch sees one) every mode trains a bf16 base with
fp32 LoRA, and MFU is against a bf16 matmul peak; peak memory is torch's max allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

HERE = Path(__file__).resolve()
# The model every mode trains: the default (SmolLM2-135M-Instruct) unless the GPU check points it
# at another folder.
BENCH_MODEL = os.environ.get("LORASFT_BENCH_MODEL", "default")
# One optimisation recipe for every mode: lorasft's defaults (the demo's 1e-3 is for one epoch).
LR = 2e-4
SCHEDULE = {"learning_rate": LR, "lr_scheduler_type": "cosine", "warmup_steps": 0.05}


class Counter:
    """Wraps a collator to count what each batch really holds, batch by batch (the data loader
    prepares a batch ahead of the step that uses it, so totals at a step would be off by one)."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, features):
        batch = self.collate(features)
        # Real tokens from the records themselves: packed batches carry no attention mask, and
        # the naive pipeline's records arrive already padded (their mask says what is real).
        real = sum(sum(f["attention_mask"]) if "attention_mask" in f else len(f["input_ids"])
                   for f in features)  # fmt: skip
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        self.batches.append((real, supervised, batch["input_ids"].numel()))
        return batch


class Clock(TrainerCallback):
    """Times the steps after the first (warm-up) one: from the end of step 1 to the end of the
    last step; keeps each step's time too."""

    def __init__(self):
        self.start = self.end = self.began = None
        self.steps: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        sync()
        now = time.perf_counter()
        self.steps.append(now - self.began)
        self.start = now if state.global_step == 1 else self.start
        self.end = now if state.global_step == state.max_steps else self.end


def on_cuda() -> bool:
    return torch.cuda.is_available()  # the parent hides the GPU from the children for --device cpu


def base_dtype() -> torch.dtype:
    """The frozen base's dtype in every mode: fp32 on CPU (bf16 is emulated on AVX2 CPUs), bf16 on
    a GPU (what lorasft's precision=auto picks there, and TRL's default)."""
    return torch.bfloat16 if on_cuda() else torch.float32


def matmul_peak_gflops(reps: int = 10) -> float:
    n = 8192 if on_cuda() else 2048
    kw = {"device": "cuda", "dtype": base_dtype()} if on_cuda() else {}
    a, b = torch.randn(n, n, **kw), torch.randn(n, n, **kw)
    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def peak_memory_mib() -> float:
    if on_cuda():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lorasft_trainer(steps: int, extra: list[str]):
    from lorasft.config import load_config
    from lorasft.data.prepare import prepare
    from lorasft.train.fit import build_trainer
    from lorasft.train.setup import prepare_model_and_tokenizer

    demo = str(files("lorasft") / "assets" / "demo.yaml")
    cfg = load_config(demo, [f"train.max_steps={steps}", "train.batch_size=8", "lora.r=8", f"train.learning_rate={LR}",
                             "lora.target_modules=[q_proj,v_proj]", "lora.alpha=16",
                             "data.augment.neftune_noise_alpha=null", "train.eval_strategy=no",
                             "train.early_stopping_patience=null", "train.save_steps=100000",
                             "output.run_dir=/tmp/lorasft-bench", *extra])  # fmt: skip
    _, precision, tok, model = prepare_model_and_tokenizer(cfg)
    data = prepare(cfg.data, tok)
    return build_trainer(cfg, model, tok, data, Path(cfg.output.run_dir), precision)


def same_lora():
    """The LoRA every mode trains: r=8 on q/v, with lorasft's default dropout (PEFT's is 0, and
    dropout costs time on CPU, so the comparison must not differ in it)."""
    from peft import LoraConfig

    from lorasft.config import LoraSection

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=LoraSection().dropout,
                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")  # fmt: skip


def naive_trainer(steps: int, max_length: int = 512):
    """The common tutorial pipeline: tokenize with padding="max_length", labels = input_ids with
    padding masked, the model's own loss over every position."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    from lorasft.data.formats import load_file
    from lorasft.data.prepare import demo_files
    from lorasft.model.load import resolve_model_path

    path = resolve_model_path(BENCH_MODEL)
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype())
    model = get_peft_model(model, same_lora())
    args = TrainingArguments(output_dir="/tmp/naive-bench", max_steps=steps, per_device_train_batch_size=8,
                             bf16=on_cuda(), **SCHEDULE, report_to=[], save_strategy="no", disable_tqdm=True)  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                   data_collator=default_data_collator)  # fmt: skip


def trl_trainer(steps: int):
    """TRL's SFTTrainer with its defaults for prompt-completion data (dynamic padding, loss on
    the completion), the same LoRA and batch; only when trl is installed."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lorasft.data.formats import load_file
    from lorasft.data.prepare import demo_files
    from lorasft.model.load import resolve_model_path

    path = resolve_model_path(BENCH_MODEL)
    examples, _, _ = load_file(demo_files()[0])
    rows = [{"prompt": e.messages[:-1], "completion": e.messages[-1:]} for e in examples]
    for row in rows:  # TRL's templates take role/content only
        row["prompt"] = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
    args = SFTConfig(output_dir="/tmp/trl-bench", max_steps=steps, per_device_train_batch_size=8,
                     bf16=on_cuda(),  # the base dtype of the other modes (TRL defaults to bf16)
                     **SCHEDULE, max_length=512, report_to=[], save_strategy="no",
                     disable_tqdm=True)  # fmt: skip
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype()),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=same_lora(),
    )


def held_out_loss(model) -> float:
    """Response-token loss on the demo's eval records, encoded the one way lorasft does for every
    mode, so the pipelines are compared on the same yardstick after the same number of steps."""
    from lorasft.config import load_config
    from lorasft.data.prepare import prepare
    from lorasft.eval.perplexity import perplexity
    from lorasft.model.load import load_tokenizer, resolve_model_path

    cfg = load_config(str(files("lorasft") / "assets" / "demo.yaml"), [])
    tok = load_tokenizer(resolve_model_path(BENCH_MODEL))
    return perplexity(model, prepare(cfg.data, tok).eval, tok.pad_token_id)["loss"]


def run_mode(mode: str, steps: int, pad_multiple: int | None = None):
    if mode == "peak":  # measured in a child too, on the device (and threads) the modes used
        return matmul_peak_gflops()
    set_seed(0)
    trainer = {"naive": lambda: naive_trainer(steps), "lorasft": lambda: lorasft_trainer(steps, []),
               "packed": lambda: lorasft_trainer(steps, ["data.packing=true"]),
               "compiled": lambda: lorasft_trainer(steps, ["train.torch_compile=true"]),
               "trl": lambda: trl_trainer(steps)}[mode]()  # fmt: skip
    if pad_multiple and mode in ("lorasft", "compiled"):  # fewer shapes for the compiler
        trainer.data_collator.pad_to_multiple_of = pad_multiple
    counter = Counter(trainer.data_collator)
    trainer.data_collator = counter
    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    seconds = clock.end - clock.start
    per_step = trainer.args.gradient_accumulation_steps
    timed = counter.batches[per_step : steps * per_step]  # the batches of steps 2..steps
    real, sup, comp = (sum(b[i] for b in timed) for i in range(3))
    eval_loss = held_out_loss(trainer.model)
    params = sum(p.numel() for p in trainer.model.parameters())
    head = trainer.model.get_input_embeddings().weight.numel()  # tied with the output head
    return {"mode": mode, "seconds_per_step": seconds / (steps - 1), "real_tps": real / seconds,
            "supervised_tps": sup / seconds, "padding_share": 1 - real / comp, "eval_loss": eval_loss,
            "peak_mib": peak_memory_mib(),
            # Steady state: the median step of the second half (after any compiling).
            "median_late_step_s": sorted(clock.steps[steps // 2 :])[(steps - steps // 2) // 2],
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
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip
    ap.add_argument(
        "--pad-multiple", type=int, help="pad lorasft/compiled batches to a multiple of this"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(run_mode(a.child, a.steps, a.pad_multiple)))
        return
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU on this machine")
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if a.device == "cpu" else {})}
    results = []
    for mode in a.modes.split(","):
        pad = ["--pad-multiple", str(a.pad_multiple)] if a.pad_multiple else []
        out = subprocess.run([sys.executable, str(HERE), "--child", mode, "--steps", str(a.steps), *pad],
                             capture_output=True, text=True, check=True, env=env).stdout  # fmt: skip
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    peak = json.loads(subprocess.run([sys.executable, str(HERE), "--child", "peak"], capture_output=True,
                                     text=True, check=True, env=env).stdout.split("RESULT ", 1)[1])  # fmt: skip
    where = (f"{torch.cuda.get_device_name()}, bf16" if a.device == "cuda" else
             f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, fp32")  # fmt: skip
    print(f"torch {torch.__version__}, {where} matmul peak {peak:.1f} GFLOP/s")
    print(
        f"{'mode':8} {'real tok/s':>10} {'sup tok/s':>10} {'pad %':>6} {'s/step':>7} {'peak MiB':>9} {'~MFU %':>7} {'eval loss':>9} {'late s/step':>11}"
    )
    for r in results:
        print(
            f"{r['mode']:8} {r['real_tps']:10.1f} {r['supervised_tps']:10.1f} {100 * r['padding_share']:6.1f} "
            f"{r['seconds_per_step']:7.2f} {r['peak_mib']:9.0f} {100 * r['gflops'] / peak:7.1f} {r['eval_loss']:9.4f} {r['median_late_step_s']:11.2f}"
        )
    by = {r["mode"]: r for r in results}
    for ref in ("naive", "trl"):
        for r in results:
            if ref in by and r["mode"] not in (ref, "naive", "trl"):
                print(
                    f"{r['mode']} / {ref}: {r['real_tps'] / by[ref]['real_tps']:.1f}x real tokens/s"
                )
    if "lorasft" in by:
        # The most this machine can give lorasft's workload: every useful FLOP at the matmul peak.
        ceiling = by["lorasft"]["real_tps"] * peak / by["lorasft"]["gflops"]
        refs = ", ".join(
            f"{ceiling / by[m]['real_tps']:.1f}x {m}" for m in ("naive", "trl") if m in by
        )
        print(
            f"ceiling at 100% of the matmul peak: {ceiling:.1f} real tokens/s"
            + (f" ({refs})" if refs else "")
        )


if __name__ == "__main__":
    main()
