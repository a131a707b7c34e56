"""`lorasft train`, top-down: check -> run folder -> model and tokenizer -> fit (or stages) ->
save the adapter -> evaluate and report (rank 0)."""

from __future__ import annotations

from pathlib import Path

from lorasft.config import BASE_MUTATING_INIT, Config, ConfigError, dump_config, for_answers
from lorasft.console import say
from lorasft.data.prepare import training_answers_han_share
from lorasft.model.lora import trainable_summary
from lorasft.model.precision import base_dtype
from lorasft.model.reopen import write_run_info
from lorasft.run_files import CONFIG, INITIAL_ADAPTER
from lorasft.train.fit import TrainOutcome, fit
from lorasft.train.launch import (
    decided_by_rank0,
    leave_process_group,
    process_state,
    quiet_accelerator_detection,
)
from lorasft.train.setup import (
    check_before_loading,
    prepare_model_and_tokenizer,
    run_dir_and_checkpoint,
)
from lorasft.train.stages import train_stages
from lorasft.train.trackers import log_final, report_to, tracking

SHARDED = ("FSDP", "DEEPSPEED")


def train(cfg: Config) -> TrainOutcome:
    check_before_loading(cfg.train)
    quiet_accelerator_detection()
    state = process_state()  # joins the process group when launched by torchrun / accelerate
    cfg, by_answers = settings_for_answers(cfg)
    run_dir, checkpoint = decided_by_rank0(lambda: run_dir_and_checkpoint(cfg))  # one folder
    if state.is_main_process:
        open_run_folder(run_dir, cfg, checkpoint)
    with state.main_process_first():  # rank 0 converts a GGUF once; the others read the cache
        model_path, precision, tok, model = prepare_model_and_tokenizer(cfg)
    if state.is_main_process:
        write_run_info(run_dir, precision, base_dtype(cfg.model.dtype, precision), model_path,
                       cfg.model.quantization)  # fmt: skip
    if state.is_main_process and cfg.lora.init in BASE_MUTATING_INIT:
        model.save_pretrained(run_dir / INITIAL_ADAPTER)  # before any step (or resumed weights)
    params = trainable_summary(model)
    say(f"model {model_path} ({precision}); trainable parameters "
        f"{params['trainable']:,} of {params['total']:,} ({params['share']:.2%})")  # fmt: skip
    trackers = report_to(cfg.train.report_to)
    with tracking(trackers, run_dir, cfg.output.name, state.is_main_process):
        if cfg.stages:
            out = train_stages(cfg, model, tok, run_dir, precision, model_path,
                               state.is_main_process)  # fmt: skip
        else:
            out = fit(cfg, model, tok, run_dir, precision, checkpoint)
        out.is_main = state.is_main_process
        out.info.update(precision=precision, base_model=str(model_path), parameters=params,
                        processes=state.num_processes, by_answer_language=by_answers,
                        quantization=cfg.model.quantization)  # fmt: skip
        save_adapter(out, tok)
        leave_process_group()
        if out.is_main:
            log_final(out.trainer, finish(out, cfg))
    return out


def settings_for_answers(cfg: Config) -> tuple[Config, dict | None]:
    """`lora.by_answer_language` on the training files' answers (one run, not stages: a stage's
    files are its own), said when it changes a setting."""
    if cfg.stages or not cfg.lora.by_answer_language:
        return cfg, None
    cfg, done = for_answers(cfg, training_answers_han_share(cfg.data))
    if done["applied"]:
        settings = ", ".join(f"{k}={v}" for k, v in done["applied"].items())
        say(f"{done['han_share']:.0%} of the training answers' characters are Chinese: "
            f"{settings} (lora.by_answer_language; bench/defaults/README.md)")  # fmt: skip
    return cfg, done


def open_run_folder(run_dir: Path, cfg: Config, checkpoint: str | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / CONFIG)
    say(f"run folder: {run_dir}" + (f" (resuming {checkpoint})" if checkpoint else ""))


def save_adapter(out: TrainOutcome, tok) -> None:
    """Rank 0 saves the adapter and tokenizer; sharded weights are gathered by every rank."""
    if out.info.get("distributed") in SHARDED:
        out.trainer.save_model(str(out.run_dir))
    elif out.is_main:
        initial = out.run_dir / INITIAL_ADAPTER
        # pissa/olora: saved as a plain LoRA (rank 2r) on the unchanged base (PEFT's conversion)
        out.model.save_pretrained(out.run_dir, path_initial_model_for_weight_conversion=(
            str(initial) if initial.is_dir() else None))  # fmt: skip
    if out.is_main:
        check_saved(out.run_dir)
        tok.save_pretrained(out.run_dir)


def check_saved(run_dir: Path) -> None:
    if not (run_dir / "adapter_model.safetensors").is_file():
        raise ConfigError(
            f"{run_dir}: no adapter_model.safetensors was written. With DeepSpeed ZeRO-3 set "
            '"stage3_gather_16bit_weights_on_model_save": true in zero_optimization; with FSDP '
            "keep fsdp_config.state_dict_type FULL_STATE_DICT (the default)"
        )


def finish(out: TrainOutcome, cfg: Config) -> dict:
    """Rank 0, alone: evaluate and write results.json, the plots and samples; the results."""
    from lorasft.eval.finish import finish_run

    sharded = out.info.get("distributed") in SHARDED
    # Evaluate the saved adapter when the in-memory model is not the run: a sharded one holds
    # this rank's shard; with pissa/olora its base lost the part moved into the adapter, so its
    # "base" answers would be wrong (and cached as the base's).
    if sharded or cfg.lora.init in BASE_MUTATING_INIT:
        from lorasft.model.reopen import open_run

        if sharded:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # load whole, not partitioned over the ranks that left
        out.model = open_run(out.run_dir).model
    d = out.data
    return finish_run(out.run_dir, out.model, out.tokenizer, cfg, d.eval_examples, d.eval,
                      out.log_history, out.info, d.counts)  # fmt: skip
