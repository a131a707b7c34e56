"""One training pass: data -> Trainer -> fit. An ordinary run is one pass; a staged run, several."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

from lorasft.config import Config, ConfigError, TrainSection
from lorasft.console import say
from lorasft.data.collate import PadCollator
from lorasft.data.packing import PackedCollator, check_packing, pack
from lorasft.data.prepare import Prepared, describe, prepare
from lorasft.data.tokenize import Encoded
from lorasft.model.loss import LossSettings, check_kernel, say_kernel
from lorasft.model.plan import choose_micro_batch
from lorasft.model.s2attn import s2_training
from lorasft.train.launch import decided_by_rank0
from lorasft.train.progress import ProgressFile, on_terminal, readable_progress
from lorasft.train.trackers import report_to
from lorasft.train.trainer import GenerationScores, SupervisedTrainer

TB_VARIABLE = "TENSORBOARD_LOGGING_DIR"
OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "sgd": "sgd",
              "adafactor": "adafactor"}  # fmt: skip


@dataclass
class TrainOutcome:
    run_dir: Path
    model: Any
    tokenizer: Any
    data: Prepared
    log_history: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    is_main: bool = True  # rank 0 of a distributed run: the one that evaluates and writes
    trainer: Any = None  # the (last) Trainer, to save weights that are sharded across ranks


def fit(cfg: Config, model, tok, run_dir: Path, precision: str,
        checkpoint: str | None = None) -> TrainOutcome:  # fmt: skip
    """One training pass on cfg.data with cfg.train: an ordinary run, or one stage of a staged run."""
    data = prepare(cfg.data, tok)
    for line in describe(data.counts):
        say(line)
    cfg = fit_micro_batch(cfg, model, data, precision)
    trainer = build_trainer(cfg, model, tok, data, run_dir, precision)
    start = time.perf_counter()
    with s2_training(model, cfg.context, cfg.data.max_length):
        result = trainer.train(resume_from_checkpoint=checkpoint)
    info = {
        "train_seconds": round(time.perf_counter() - start, 2),
        "train_metrics": result.metrics,
        "global_step": trainer.state.global_step,
        "best_step": _best_step(trainer.state.best_model_checkpoint),
        "best_metric": trainer.state.best_metric,
        "best_metric_name": trainer.args.metric_for_best_model,
        "resumed_from": checkpoint,
        "distributed": trainer.accelerator.distributed_type.value,
        "micro_batch": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
    }
    return TrainOutcome(
        run_dir, trainer.model, tok, data, trainer.state.log_history, info, trainer=trainer
    )


def _best_step(best_checkpoint: str | None) -> int | None:
    return int(best_checkpoint.rsplit("-", 1)[1]) if best_checkpoint else None


def to_dataset(encoded: list[Encoded]) -> Dataset:
    return Dataset.from_list(
        [{"input_ids": e.input_ids, "labels": e.labels, "length": len(e)} for e in encoded]
    )


def train_dataset_and_collator(cfg: Config, model, tok, data: Prepared):
    if not cfg.data.packing:
        return to_dataset(data.train), PadCollator(tok.pad_token_id)
    check_packing(model.get_base_model().config.model_type)
    rows = pack(data.train, cfg.data.max_length)
    say(f"packing: {len(data.train)} sequences into {len(rows)} rows of <= "
        f"{cfg.data.max_length} tokens")  # fmt: skip
    ds = Dataset.from_list([{**vars(r), "length": len(r.input_ids)} for r in rows])
    flash = cfg.model.attn_implementation.startswith("flash_attention")
    return ds, PackedCollator(tok.pad_token_id, flatten=flash)


def generation_scores(cfg: Config, tok, data: Prepared) -> GenerationScores:
    """What a generation metric_for_best_model is computed from at each evaluation."""
    from lorasft.model.generation import GenSettings

    metric = cfg.train.metric_for_best_model
    if cfg.train.fsdp or cfg.train.deepspeed:
        raise ConfigError(f"train.metric_for_best_model={metric} generates at every evaluation, "
                          "which lorasft does with one process or DDP, not with FSDP or "
                          "DeepSpeed; use eval_loss there")  # fmt: skip
    scores = GenerationScores(tok, data.eval_examples, GenSettings.from_config(cfg.eval),
                              cfg.eval.num_samples)  # fmt: skip
    if not scores.refs:
        raise ConfigError(f"train.metric_for_best_model={metric} needs eval records to generate "
                          "on (chat or instruction records, and eval.num_samples > 0)")  # fmt: skip
    return scores


def build_trainer(cfg: Config, model, tok, data: Prepared, run_dir: Path,
                  precision: str) -> Trainer:  # fmt: skip
    has_eval = bool(data.eval) and cfg.train.eval_strategy != "no"
    args = training_arguments(
        cfg.train, run_dir, precision, cfg.data.augment.neftune_noise_alpha, has_eval
    )
    callbacks = []
    if has_eval and cfg.train.early_stopping_patience:
        callbacks.append(
            EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience)
        )
    train_ds, collator = train_dataset_and_collator(cfg, model, tok, data)
    optimizer = loraplus_optimizer(model, cfg.train)
    with tensorboard_folder(run_dir / "tensorboard"):
        trainer = SupervisedTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=to_dataset(data.eval) if has_eval else None,
            data_collator=collator,
            processing_class=tok,
            callbacks=callbacks,
            optimizers=(optimizer, None),
        )
    if has_eval and cfg.train.metric_for_best_model != "eval_loss":
        trainer.generation_scores = generation_scores(cfg, tok, data)
    trainer.loss_settings = loss_settings(cfg.train, model)
    report_sharding(cfg, trainer)
    readable_progress(trainer)
    trainer.add_callback(ProgressFile(run_dir))
    return trainer


def loraplus_optimizer(model, t: TrainSection):
    """LoRA+ (train.loraplus_lr_ratio): PEFT's AdamW with B's learning rate ratio x A's; None
    leaves the optimizer to the Trainer (train.optimizer)."""
    if not t.loraplus_lr_ratio:
        return None
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=t.learning_rate,
                                     loraplus_lr_ratio=t.loraplus_lr_ratio,
                                     loraplus_weight_decay=t.weight_decay,
                                     loraplus_lr_embedding=t.learning_rate)  # fmt: skip


def loss_settings(t: TrainSection, model) -> LossSettings:
    """The run's loss kernel, checked before the first step, and said once."""
    problem = check_kernel(t.fused_loss, t.loss_chunk_tokens)
    if problem:
        raise ConfigError(problem)
    loss = LossSettings.from_train(t)
    say(say_kernel(model, loss))
    return loss


def report_sharding(cfg: Config, trainer: Trainer) -> None:
    """accelerate shards (FSDP) on GPUs only; on CPU it drops the setting and runs DDP, which the
    user must hear about rather than find out from the memory use."""
    if cfg.train.fsdp and not trainer.is_fsdp_enabled:
        say(f"train.fsdp is not in effect: accelerate runs FSDP on GPUs only, so this "
            f"run is {trainer.accelerator.distributed_type.value} (every process holds the whole "
            "model)")  # fmt: skip


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
        report_to=report_to(t.report_to),
        run_name=run_dir.name,
        dataloader_pin_memory=torch.cuda.is_available(),
        # On a CPU-only machine this is what makes torchrun/accelerate run DDP over gloo.
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=t.dataloader_workers,
        torch_compile=t.torch_compile,
        fsdp=t.fsdp,
        fsdp_config=t.fsdp_config,
        deepspeed=t.deepspeed,
        disable_tqdm=not on_terminal(),  # no bars in a log file (ProgressLines instead)
        include_num_input_tokens_seen="non_padding",  # for the tokens/s in the progress lines
    )


@contextmanager
def tensorboard_folder(path: Path) -> Iterator[None]:
    """transformers 5's TensorBoard callback reads its folder from this variable when the Trainer
    is built; set it for this Trainer only, so the next run or stage in the same process logs
    into its own folder."""
    before = os.environ.get(TB_VARIABLE)
    os.environ[TB_VARIABLE] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TB_VARIABLE, None)
        else:
            os.environ[TB_VARIABLE] = before


def fit_micro_batch(cfg: Config, model, data: Prepared, precision: str) -> Config:
    """With train.memory_budget_gib, split the batch into the largest micro-batches whose
    estimated peak fits the budget; gradient accumulation keeps the optimizer's batch."""
    t = cfg.train
    if t.memory_budget_gib is None or not data.train:
        return cfg
    length = cfg.data.max_length if cfg.data.packing else max(len(e) for e in data.train)
    if t.memory_budget_gib == "auto":  # rank 0 measures, so every rank picks the same split
        budget = decided_by_rank0(memory_budget_bytes)
    else:
        budget = int(t.memory_budget_gib * 2**30)
    micro, peak = choose_micro_batch(model, cfg, length, precision, budget)
    accum = t.grad_accum * t.batch_size // micro
    say(f"micro-batch {micro} x {accum} accumulation steps for a batch of "
        f"{t.batch_size * t.grad_accum}: estimated peak {peak / 2**30:.2f} GiB of a "
        f"{budget / 2**30:.2f} GiB budget at {length} tokens")  # fmt: skip
    return cfg.model_copy(
        update={"train": t.model_copy(update={"batch_size": micro, "grad_accum": accum})}
    )


def memory_budget_bytes() -> int:
    """90% of the GPU's memory; on CPU, 90% of this process's share of the free RAM plus what it
    already holds (the model)."""
    if torch.cuda.is_available():
        return int(0.9 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    held = psutil.Process().memory_info().rss
    return int(0.9 * (psutil.virtual_memory().available / local + held))
