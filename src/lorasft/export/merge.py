"""Merge a run's LoRA adapter(s) into the base weights and save a plain Hugging Face model folder.

The folder needs nothing from lorasft to load: safetensors weights, config, the tokenizer with the
chat template the run trained with, and a generation config whose EOS is the run's stop ids (so
`generate` and vLLM end turns where training did).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from lorasft.data.tokenize import stop_ids
from lorasft.model.adapter import load_run
from lorasft.model.load import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _set_weight(model: PeftModel, adapter: str, weight: float) -> None:
    """Scale one adapter's contribution (`set_scale` keeps alpha / r and multiplies by `weight`)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            module.set_scale(adapter, weight)


def _check_same_base(cfg, run: Path, other_cfg) -> None:
    if other_cfg.model.path != cfg.model.path:
        raise ModelError(
            f"{run}: trained on model.path={other_cfg.model.path!r}, but the first run used "
            f"{cfg.model.path!r}; only adapters of the same base can be merged together"
        )
    if other_cfg.context != cfg.context:  # the context extension changes the base itself
        raise ModelError(
            f"{run}: trained with context settings {other_cfg.context}, the first run with "
            f"{cfg.context}; only adapters of the same extended base can be merged together"
        )


def merge_runs(run_dirs: list[str | Path], weights: list[float] | None = None):
    """`(cfg, tokenizer, merged model)` in float32. Adapters are merged in the order given, each
    scaled by its weight; config and tokenizer come from the first run."""
    from lorasft.config import load_config

    weights = list(weights) if weights else [1.0] * len(run_dirs)
    if len(weights) != len(run_dirs):
        raise ModelError(
            f"--weights: {len(weights)} weights for {len(run_dirs)} runs; give one per run"
        )
    cfg, tok, model = load_run(run_dirs[0])
    _set_weight(model, "default", weights[0])
    merged = model.merge_and_unload()
    for run, weight in zip(run_dirs[1:], weights[1:]):
        run = Path(run)
        if not (run / "adapter_config.json").is_file():
            raise ModelError(f"{run} is not a finished lorasft run: adapter_config.json is missing")
        _check_same_base(cfg, run, load_config(run / "config.yaml"))
        peft = PeftModel.from_pretrained(merged, run)
        _set_weight(peft, "default", weight)
        merged = peft.merge_and_unload()
    merged.eval()
    return cfg, tok, merged


def set_generation_ids(model, tok) -> None:
    gen = model.generation_config
    gen.eos_token_id = stop_ids(tok)
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id


def merge(run_dirs: list[str | Path], out: str | Path, dtype: str = "float32",
          weights: list[float] | None = None) -> Path:  # fmt: skip
    """Write the merged model folder; returns its path."""
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"--out {out}: the folder exists and is not empty; choose a new folder")
    _, tok, model = merge_runs(run_dirs, weights)
    model = model.to(DTYPES[dtype])
    set_generation_ids(model, tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
