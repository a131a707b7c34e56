"""Everything `lorasft train` builds before the first step: run folder, tokenizer, model, args."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.integrations import is_tensorboard_available

from lorasft.config import Config, ConfigError, TrainSection
from lorasft.data.templates import resolve_template
from lorasft.model.context import apply_context, context_modules_to_save
from lorasft.model.load import load_model, load_tokenizer, resolve_model_path
from lorasft.model.lora import apply_lora
from lorasft.train.checkpoints import find_resume

OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "sgd": "sgd",
              "adafactor": "adafactor"}  # fmt: skip


def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast on CPUs with AVX512-BF16 or AMX; elsewhere they are emulated and
    (measured on an AVX2-only EPYC) about 35x slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str) -> str:
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "bf16" and not cuda and not cpu_has_bf16():
        print("[lorasft] train.precision=bf16: this CPU has no AVX512-BF16/AMX, bf16 would be "
              "emulated and many times slower; using fp32", file=sys.stderr)  # fmt: skip
        return "fp32"
    if precision == "fp16" and not cuda:
        print("[lorasft] train.precision=fp16 needs a GPU; using fp32", file=sys.stderr)
        return "fp32"
    return precision


def base_dtype(cfg: Config, precision: str) -> torch.dtype:
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def new_run_dir(cfg: Config) -> Path:
    if cfg.output.run_dir:
        return Path(cfg.output.run_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.dir) / f"{cfg.output.name}-{stamp}"


def run_dir_and_checkpoint(cfg: Config) -> tuple[Path, str | None]:
    """Where this run writes, and the checkpoint it continues from (None for a fresh start)."""
    if cfg.train.resume is None:
        return new_run_dir(cfg), None
    found = find_resume(cfg.train.resume, cfg.output)
    if found is None:
        print(f"[lorasft] resume=auto: no checkpoint of run '{cfg.output.name}' under "
              f"{cfg.output.dir}; starting a new run", file=sys.stderr)  # fmt: skip
        return new_run_dir(cfg), None
    return found


def load_tokenizer_with_template(cfg: Config, model_path: Path):
    tok = load_tokenizer(model_path, cfg.model.trust_remote_code)
    # The run's tokenizer carries the template it trains with; eval, generate, merge and serve
    # read it back from the run folder, so every consumer renders prompts identically.
    tok.chat_template = resolve_template(cfg.data.template, tok)
    return tok


def build_model(cfg: Config, model_path: Path, precision: str):
    model = load_model(
        model_path,
        dtype=base_dtype(cfg, precision),
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        global_dropout=cfg.model.global_dropout,
    )
    plan = apply_context(model, cfg.context)  # before LoRA: it resizes and rebuilds modules
    if plan is not None:
        factor = f", factor {plan.factor:g}" if plan.factor else ""
        print(
            f"[lorasft] context: {plan.method} from {plan.original} to {plan.target} positions{factor}"
        )
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return apply_lora(model, lora_with_context(model, cfg))


def lora_with_context(model, cfg: Config):
    """The LoRA section plus the modules the context section trains in full (saved with the adapter)."""
    extra = context_modules_to_save(model, cfg.context)
    if not extra:
        return cfg.lora
    names = list(dict.fromkeys([*(cfg.lora.modules_to_save or []), *extra]))
    return cfg.lora.model_copy(update={"modules_to_save": names})


def prepare_model_and_tokenizer(cfg: Config):
    model_path = resolve_model_path(cfg.model.path)
    precision = resolve_precision(cfg.train.precision)
    tok = load_tokenizer_with_template(cfg, model_path)
    return model_path, precision, tok, build_model(cfg, model_path, precision)


def check_optimizer(name: str) -> None:
    """8-bit AdamW needs bitsandbytes and, in practice, a CUDA device."""
    if name != "adamw_8bit":
        return
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "train.optimizer=adamw_8bit needs a CUDA GPU and the bitsandbytes package "
            f"(GPU: {torch.cuda.is_available()}, bitsandbytes installed: "
            f"{importlib.util.find_spec('bitsandbytes') is not None}); use train.optimizer=adamw"
        )


def check_launch(t: TrainSection) -> None:
    """FSDP shards over processes; in one it is an error from transformers after minutes of loading."""
    if t.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ConfigError(
            f"train.fsdp={t.fsdp!r} needs a distributed launch: torchrun --nproc-per-node N -m "
            "lorasft train CONFIG (or accelerate launch --multi_gpu ...); remove train.fsdp to "
            "train in one process"
        )


def training_arguments(t: TrainSection, run_dir: Path, precision: str, neftune: float | None,
                       has_eval: bool) -> TrainingArguments:  # fmt: skip
    strategy = t.eval_strategy if has_eval else "no"
    save_strategy = "steps" if (t.save_steps or strategy == "no") else strategy
    save_steps = t.save_steps or (t.eval_steps if strategy == "steps" else 50)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_grad_norm=t.max_grad_norm,
        optim=OPTIMIZERS[t.optimizer],
        seed=t.seed,
        data_seed=t.seed,
        # Autocast on GPU; on CPU a bf16 base runs as stored, and peft casts into fp32 LoRA.
        bf16=precision == "bf16" and torch.cuda.is_available(),
        fp16=precision == "fp16",
        eval_strategy=strategy,
        eval_steps=t.eval_steps,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        load_best_model_at_end=t.load_best_model_at_end and strategy != "no",
        metric_for_best_model=t.metric_for_best_model,
        greater_is_better=not t.metric_for_best_model.endswith("loss"),
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        neftune_noise_alpha=neftune,
        remove_unused_columns=False,
        prediction_loss_only=True,  # logits are kept only at supervised positions
        report_to=["tensorboard"] if is_tensorboard_available() else [],
        dataloader_pin_memory=torch.cuda.is_available(),
        # On a CPU-only machine this is what makes torchrun/accelerate run DDP over gloo.
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=t.dataloader_workers,
        torch_compile=t.torch_compile,
        fsdp=t.fsdp,
        fsdp_config=t.fsdp_config,
        deepspeed=t.deepspeed,
        disable_tqdm=False,
    )
