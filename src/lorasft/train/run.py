"""`lorasft train`: setup -> fit -> save. Evaluation and reports follow in the caller."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from transformers import EarlyStoppingCallback, Trainer, set_seed

from lorasft.config import Config, ConfigError, dump_config
from lorasft.data.collate import PadCollator
from lorasft.data.packing import PackedCollator, check_packing, pack
from lorasft.data.prepare import Prepared, describe, prepare
from lorasft.data.tokenize import Encoded
from lorasft.model.lora import trainable_summary
from lorasft.model.plan import choose_micro_batch
from lorasft.train.setup import (
    check_launch,
    check_optimizer,
    prepare_model_and_tokenizer,
    run_dir_and_checkpoint,
    training_arguments,
)
from lorasft.train.trainer import SupervisedTrainer


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


def to_dataset(encoded: list[Encoded]) -> Dataset:
    return Dataset.from_list(
        [{"input_ids": e.input_ids, "labels": e.labels, "length": len(e)} for e in encoded]
    )


def train_dataset_and_collator(cfg: Config, model, tok, data: Prepared):
    if not cfg.data.packing:
        return to_dataset(data.train), PadCollator(tok.pad_token_id)
    check_packing(model.get_base_model().config.model_type)
    rows = pack(data.train, cfg.data.max_length)
    say(
        f"[lorasft] packing: {len(data.train)} sequences into {len(rows)} rows of <= {cfg.data.max_length} tokens"
    )
    ds = Dataset.from_list([{**vars(r), "length": len(r.input_ids)} for r in rows])
    flash = cfg.model.attn_implementation.startswith("flash_attention")
    return ds, PackedCollator(tok.pad_token_id, flatten=flash)


def build_trainer(
    cfg: Config, model, tok, data: Prepared, run_dir: Path, precision: str
) -> Trainer:
    has_eval = bool(data.eval) and cfg.train.eval_strategy != "no"
    args = training_arguments(
        cfg.train, run_dir, precision, cfg.data.augment.neftune_noise_alpha, has_eval
    )
    callbacks = []
    if has_eval and cfg.train.early_stopping_patience:
        callbacks.append(
            EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience)
        )
    # The TensorBoard callback reads its folder from this variable (transformers 5).
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    train_ds, collator = train_dataset_and_collator(cfg, model, tok, data)
    trainer = SupervisedTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=to_dataset(data.eval) if has_eval else None,
        data_collator=collator,
        processing_class=tok,
        callbacks=callbacks,
    )
    report_sharding(cfg, trainer)
    return trainer


def report_sharding(cfg: Config, trainer: Trainer) -> None:
    """accelerate shards (FSDP) on GPUs only; on CPU it drops the setting and runs DDP, which the
    user must hear about rather than find out from the memory use."""
    if cfg.train.fsdp and not trainer.is_fsdp_enabled:
        say(f"[lorasft] train.fsdp is not in effect: accelerate runs FSDP on GPUs only, so this "
            f"run is {trainer.accelerator.distributed_type.value} (every process holds the whole "
            "model)")  # fmt: skip


def process_state() -> PartialState:
    """This process's place in a torchrun/accelerate launch (one process otherwise). On a
    CPU-only machine accelerate needs cpu=True to form a gloo process group."""
    return PartialState(cpu=not torch.cuda.is_available())


def say(message: str) -> None:
    """Console output from rank 0 only."""
    process_state().print(message)


def decided_by_rank0(decide: Callable[[], Any]) -> Any:
    """Rank 0 calls `decide` and every process of a torchrun/accelerate launch gets its answer
    (one process: just the answer)."""
    state = process_state()
    found = [decide() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(found)
    return found[0]


def shared_run_dir(cfg: Config) -> tuple[Path, str | None]:
    """Every process must write to the folder rank 0 chose (its timestamp)."""
    return decided_by_rank0(lambda: run_dir_and_checkpoint(cfg))


def train(cfg: Config) -> TrainOutcome:
    check_optimizer(cfg.train.optimizer)  # before minutes of loading, not after
    check_launch(cfg.train)
    state = process_state()  # joins the process group when launched by torchrun / accelerate
    run_dir, checkpoint = shared_run_dir(cfg)
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        say(
            f"[lorasft] run folder: {run_dir}" + (f" (resuming {checkpoint})" if checkpoint else "")
        )
    set_seed(cfg.train.seed)  # LoRA init draws from the RNG before Trainer seeds it
    with state.main_process_first():  # rank 0 converts a GGUF once; the others read the cache
        model_path, precision, tok, model = prepare_model_and_tokenizer(cfg)
    params = trainable_summary(model)
    say(f"[lorasft] model {model_path} ({precision}); trainable parameters "
          f"{params['trainable']:,} of {params['total']:,} ({params['share']:.2%})")  # fmt: skip
    if cfg.stages:
        from lorasft.train.stages import train_stages

        out = train_stages(cfg, model, tok, run_dir, precision, model_path)
    else:
        out = fit(cfg, model, tok, run_dir, precision, checkpoint)
    out.is_main = state.is_main_process
    sharded = out.info.get("distributed") in ("FSDP", "DEEPSPEED")
    if sharded:  # every rank takes part: the weights (or their states) are spread over them
        out.trainer.save_model(str(run_dir))
    elif out.is_main:
        out.model.save_pretrained(run_dir)
    if out.is_main:
        check_saved(run_dir)
        tok.save_pretrained(run_dir)
    out.info.update(precision=precision, base_model=str(model_path), parameters=params,
                    processes=state.num_processes)  # fmt: skip
    leave_process_group()
    if sharded and out.is_main:  # rank 0 alone evaluates, on the saved adapter, not on its shard
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from lorasft.model.adapter import load_run

        unset_hf_deepspeed_config()  # load whole, not partitioned over the ranks that have left
        _, _, out.model = load_run(run_dir)
    return out


def check_saved(run_dir: Path) -> None:
    if not (run_dir / "adapter_model.safetensors").is_file():
        raise ConfigError(
            f"{run_dir}: no adapter_model.safetensors was written. With DeepSpeed ZeRO-3 set "
            '"stage3_gather_16bit_weights_on_model_save": true in zero_optimization; with FSDP '
            "keep fsdp_config.state_dict_type FULL_STATE_DICT (the default)"
        )


def leave_process_group() -> None:
    """Every rank leaves together once the adapter is saved: rank 0 then evaluates alone, and the
    others exit without tearing down a process group rank 0 still holds."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def fit(
    cfg: Config, model, tok, run_dir: Path, precision: str, checkpoint: str | None = None
) -> TrainOutcome:
    """One training pass on cfg.data with cfg.train: an ordinary run, or one stage of a staged run."""
    data = prepare(cfg.data, tok)
    for line in describe(data.counts):
        say(f"[lorasft] {line}")
    cfg = fit_micro_batch(cfg, model, data, precision)
    trainer = build_trainer(cfg, model, tok, data, run_dir, precision)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    info = {
        "train_seconds": round(time.perf_counter() - start, 2),
        "train_metrics": result.metrics,
        "global_step": trainer.state.global_step,
        "best_step": _best_step(trainer.state.best_model_checkpoint),
        "best_metric": trainer.state.best_metric,
        "resumed_from": checkpoint,
        "distributed": trainer.accelerator.distributed_type.value,
        "micro_batch": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
    }
    return TrainOutcome(
        run_dir, trainer.model, tok, data, trainer.state.log_history, info, trainer=trainer
    )


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
    say(f"[lorasft] micro-batch {micro} x {accum} accumulation steps for a batch of "
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


def _best_step(best_checkpoint: str | None) -> int | None:
    return int(best_checkpoint.rsplit("-", 1)[1]) if best_checkpoint else None
