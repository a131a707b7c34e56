"""PEFT LoRA on a loaded base model; the frozen base keeps its dtype, adapters train in fp32."""

from __future__ import annotations

import re

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorasft.config import ConfigError, LoraSection

_ATTENTION = re.compile("attn|attention", re.IGNORECASE)


def peft_targets(model: nn.Module, targets: list[str] | str) -> list[str] | str:
    """PEFT's `target_modules` for `lora.target_modules`. "attention" names the linear layers
    inside the model's attention blocks (modules whose name holds "attn" or "attention"): by
    their own names where no layer outside attention shares one (q_proj, k_proj, v_proj, o_proj
    on Llama-like models), else by a pattern on block and layer (GPT-2 has c_proj in attn and in
    mlp). Other values pass through."""
    if targets != "attention":
        return targets
    inside: set[tuple[str, str]] = set()
    outside: set[str] = set()  # every other module's own name (PEFT matches names of any type)
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        block = parent.rpartition(".")[2]
        if isinstance(module, (nn.Linear, Conv1D)) and _ATTENTION.search(block):
            inside.add((block, leaf))
        elif name:
            outside.add(leaf)
    if not inside:
        raise ConfigError(
            "lora.target_modules=attention: this model has no linear layer inside a module named "
            "like attn or attention; give the layers' names as a list, or use all-linear. Module "
            f"names in this model include: {_module_names(model)}"
        )
    leaves = sorted({leaf for _, leaf in inside})
    if not set(leaves) & outside:
        return leaves
    blocks = sorted({block for block, _ in inside})
    return rf"(.*\.)?({'|'.join(map(re.escape, blocks))})\.({'|'.join(map(re.escape, leaves))})"


def lora_config(cfg: LoraSection, target_modules: list[str] | str) -> LoraConfig:
    """PEFT's config; `target_modules`: `peft_targets` of the model."""
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=cfg.modules_to_save,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
        task_type="CAUSAL_LM",
    )


def apply_lora(model, cfg: LoraSection) -> PeftModel:
    targets = peft_targets(model, cfg.target_modules)
    try:
        # autocast_adapter_dtype keeps LoRA weights in fp32 when the base is bf16/fp16.
        return get_peft_model(model, lora_config(cfg, targets), autocast_adapter_dtype=True)
    except ValueError as e:
        raise ConfigError(
            f"lora.target_modules={cfg.target_modules!r}: {e}. Module names in this model "
            f"include: {_module_names(model)}"
        ) from e


def _module_names(model: nn.Module, limit: int = 40) -> str:
    """The model's module names (the last part, as `target_modules` takes them), for errors."""
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
    return ", ".join(names[:limit])


def trainable_summary(model) -> dict[str, int | float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "share": round(trainable / total, 6)}
