"""What `lorasft train` builds before the first step: checks, run folder, tokenizer, model."""

from __future__ import annotations

import importlib.util
import os
from datetime import datetime
from pathlib import Path

import torch
from transformers import set_seed

from lorasft.config import Config, ConfigError, TrainSection
from lorasft.console import say
from lorasft.data.templates import attach_template
from lorasft.model.context import apply_context, context_modules_to_save
from lorasft.model.load import load_model, load_tokenizer, model_folder
from lorasft.model.lora import apply_lora
from lorasft.model.precision import base_dtype, resolve_precision
from lorasft.train.checkpoints import find_resume, find_staged_run, new_run_dir


def check_before_loading(t: TrainSection) -> None:
    """Problems that would otherwise surface after minutes of loading."""
    check_optimizer(t.optimizer)
    check_launch(t)
    check_trackers(t.report_to)


def check_trackers(names: list[str] | None) -> None:
    """train.report_to's packages are installed (at training only: a run trained with a tracker
    is still opened for eval, merge and serve where that tracker is missing)."""
    missing = [name for name in names or [] if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"train.report_to: not installed: {', '.join(missing)} (pip install "
                          f"{' '.join(missing)})")  # fmt: skip


def check_optimizer(name: str) -> None:
    """8-bit AdamW needs bitsandbytes and, in practice, a CUDA device."""
    if name != "adamw_8bit":
        return
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if not torch.cuda.is_available() or not has_bnb:
        raise ConfigError(
            "train.optimizer=adamw_8bit needs a CUDA GPU and the bitsandbytes package "
            f"(GPU: {torch.cuda.is_available()}, bitsandbytes installed: {has_bnb}); use "
            "train.optimizer=adamw"
        )


def check_launch(t: TrainSection) -> None:
    """FSDP shards over processes; in one it is an error from transformers after minutes of loading."""
    if t.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ConfigError(
            f"train.fsdp={t.fsdp!r} needs a distributed launch: torchrun --nproc-per-node N -m "
            "lorasft train CONFIG (or accelerate launch --multi_gpu ...); remove train.fsdp to "
            "train in one process"
        )


def run_dir_and_checkpoint(cfg: Config) -> tuple[Path, str | None]:
    """Where this run writes, and the checkpoint it continues from (None for a fresh start)."""
    if cfg.train.resume is None:
        return new_run_dir(cfg.output, datetime.now()), None
    if cfg.stages:  # each stage resumes from its own checkpoints (train/stages.py)
        run = find_staged_run(cfg.train.resume, cfg.output)
        if run is None:
            say(f"resume=auto: no staged run '{cfg.output.name}' under "
                f"{cfg.output.dir}; starting a new run")  # fmt: skip
        return run or new_run_dir(cfg.output, datetime.now()), None
    found = find_resume(cfg.train.resume, cfg.output)
    if found is None:
        say(f"resume=auto: no checkpoint of run '{cfg.output.name}' under "
            f"{cfg.output.dir}; starting a new run")  # fmt: skip
        return new_run_dir(cfg.output, datetime.now()), None
    return found


def tokenizer_for(cfg: Config, model_path: Path):
    """The base's tokenizer with the template this run trains with (saved into the run folder, so
    every later consumer renders prompts from the same string)."""
    return attach_template(
        load_tokenizer(model_path, cfg.model.trust_remote_code), cfg.data.template
    )


def prepare_model_and_tokenizer(cfg: Config):
    """`(base path, precision, tokenizer, LoRA model)`: the base in the precision's dtype, its
    context extended, checkpointing on when asked, LoRA applied."""
    model_path = model_folder(cfg.model)  # may convert a GGUF, drawing from the RNG
    # LoRA's init (and a context's new weights) draw from the RNG before Trainer seeds it: seeded
    # here, after any conversion, a run that converts trains as one that finds the cached folder
    set_seed(cfg.train.seed)
    precision = resolve_precision(cfg.train.precision)
    tok = tokenizer_for(cfg, model_path)
    return model_path, precision, tok, build_model(cfg, model_path, precision)


def build_model(cfg: Config, model_path: Path, precision: str):
    model = load_model(
        model_path,
        dtype=base_dtype(cfg.model.dtype, precision),
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        global_dropout=cfg.model.global_dropout,
        quantization=cfg.model.quantization,
    )
    plan = apply_context(model, cfg.context)  # before LoRA: it resizes and rebuilds modules
    if plan is not None:
        factor = f", factor {plan.factor:g}" if plan.factor else ""
        say(f"context: {plan.method} from {plan.original} to {plan.target} "
            f"positions{factor}")  # fmt: skip
    checkpointing = cfg.train.gradient_checkpointing
    if cfg.model.quantization != "none":
        # PEFT's documented preparation: the frozen base's remaining float weights (norms,
        # embeddings, head) in fp32, inputs that require grad, checkpointing when asked
        from peft import prepare_model_for_kbit_training

        say(f"QLoRA: the base's linear layers in {cfg.model.quantization} "
            "(bitsandbytes)")  # fmt: skip
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=NON_REENTRANT)  # fmt: skip
    elif checkpointing:
        set_checkpointing(model, True)
    return apply_lora(model, lora_with_context(model, cfg))


NON_REENTRANT = {"use_reentrant": False}


def set_checkpointing(model, on: bool) -> None:
    """The one switch for gradient checkpointing (non-reentrant) on a model or a PeftModel's base,
    with inputs that require grad so the adapter's gradients flow through recomputed blocks."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on and not base.is_activation_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
        model.enable_input_require_grads()
    elif not on and base.is_activation_checkpointing:
        base.gradient_checkpointing_disable()


def lora_with_context(model, cfg: Config):
    """The LoRA section plus the modules the context section trains in full (saved with the adapter)."""
    extra = context_modules_to_save(model, cfg.context)
    if not extra:
        return cfg.lora
    names = list(dict.fromkeys([*(cfg.lora.modules_to_save or []), *extra]))
    return cfg.lora.model_copy(update={"modules_to_save": names})
