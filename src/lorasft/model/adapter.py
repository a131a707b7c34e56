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
    if precision_dtype is None and cfg.model.attn_implementation.startswith("flash_attention"):
        precision_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    kwargs = {"dtype": precision_dtype} if precision_dtype is not None else {}
    base = load_model(
        resolve_model_path(cfg.model.path),
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        **kwargs,
    )
    # The adapter was trained on the extended model; rebuild that before loading it.
    apply_context(base, cfg.context)
    model = PeftModel.from_pretrained(base, run)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return cfg, tok, model
