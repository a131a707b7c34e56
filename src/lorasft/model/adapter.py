"""Load a finished run: its config, its tokenizer (with the template it trained with), base + adapter."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from lorasft.config import Config, load_config
from lorasft.model.context import apply_context
from lorasft.model.load import ModelError, load_model, load_tokenizer, resolve_model_path


def load_run(run_dir: str | Path, precision_dtype=None) -> tuple[Config, object, PeftModel]:
    run = Path(run_dir)
    for name in ("config.yaml", "adapter_config.json"):
        if not (run / name).is_file():
            raise ModelError(f"{run} is not a finished lorasft run: {name} is missing")
    cfg = load_config(run / "config.yaml")
    tok = load_tokenizer(run, cfg.model.trust_remote_code)
    # The adapter was trained on the extended model; rebuild that before loading it.
    model = PeftModel.from_pretrained(load_base(cfg, precision_dtype), run)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return cfg, tok, model


def load_base(cfg: Config, dtype: torch.dtype | None = None, with_context: bool = True):
    """A run's base model as its config loads it, with the run's context extension or without."""
    base = load_model(
        resolve_model_path(cfg.model.path),
        dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
    )
    if with_context:
        apply_context(base, cfg.context)
    return base
