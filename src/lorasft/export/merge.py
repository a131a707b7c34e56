"""Merge a run's LoRA adapter(s) into the base weights and save a plain Hugging Face model folder.

The folder needs nothing from lorasft to load: safetensors weights, config, the tokenizer with the
chat template the run trained with, and a generation config whose EOS is the run's stop ids (so
`generate` and vLLM end turns where training did).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorasft.data.tokenize import stop_ids
from lorasft.model.load import ModelError
from lorasft.model.precision import DTYPE_NAMES
from lorasft.model.reopen import RunSpec, attach, check_same_context, open_run, read_run


def _set_weight(model, adapter: str, weight: float) -> None:
    """Scale one adapter's contribution (`set_scale` keeps alpha / r and multiplies by `weight`)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            module.set_scale(adapter, weight)


def _check_same_base(first: RunSpec, other: RunSpec) -> None:
    if other.cfg.model.path != first.cfg.model.path:
        raise ModelError(
            f"{other.dir}: trained on model.path={other.cfg.model.path!r}, but the first run used "
            f"{first.cfg.model.path!r}; only adapters of the same base can be merged together"
        )
    check_same_context(first, other)


def merge_runs(run_dirs: list[str | Path], weights: list[float] | None = None):
    """`(spec of the first run, merged float32 model)`. The base is the one the run trained on,
    in the dtype it trained in (a quantized one dequantized), then widened to float32 (exact), so
    the merge adds the adapters to the very weights training saw. Adapters are merged in the order given, each scaled by its
    weight; config and tokenizer come from the first run."""
    weights = list(weights) if weights else [1.0] * len(run_dirs)
    if len(weights) != len(run_dirs):
        raise ModelError(
            f"--weights: {len(weights)} weights for {len(run_dirs)} runs; give one per run"
        )
    first = open_run(run_dirs[0], dequantize=True)  # a QLoRA run's base as the values it trained on
    model = first.model.to(torch.float32)
    _set_weight(model, "default", weights[0])
    merged = model.merge_and_unload()
    for run, weight in zip(run_dirs[1:], weights[1:]):
        spec = read_run(run)
        _check_same_base(first.spec, spec)
        peft = attach(merged, spec)
        _set_weight(peft, "default", weight)
        merged = peft.merge_and_unload()
    merged.eval()
    return first.spec, merged


def set_generation_ids(model, tok) -> None:
    gen = model.generation_config
    gen.eos_token_id = stop_ids(tok)
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id


def merge(run_dirs: list[str | Path], out: str | Path, dtype: str = "float32",
          weights: list[float] | None = None) -> Path:  # fmt: skip
    """Write the merged model folder; returns its path."""
    if dtype not in DTYPE_NAMES:
        raise ModelError(f"--dtype {dtype}: expected one of {', '.join(DTYPE_NAMES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"--out {out}: the folder exists and is not empty; choose a new folder")
    spec, model = merge_runs(run_dirs, weights)
    tok = spec.tok
    model = model.to(DTYPE_NAMES[dtype])
    set_generation_ids(model, tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
