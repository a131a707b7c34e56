"""PEFT LoRA on a loaded base model; the frozen base keeps its dtype, adapters train in fp32."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model

from lorasft.config import ConfigError, LoraSection


def lora_config(cfg: LoraSection) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=cfg.modules_to_save,
        task_type="CAUSAL_LM",
    )


def apply_lora(model, cfg: LoraSection) -> PeftModel:
    try:
        # autocast_adapter_dtype keeps LoRA weights in fp32 when the base is bf16/fp16.
        return get_peft_model(model, lora_config(cfg), autocast_adapter_dtype=True)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ConfigError(
            f"lora.target_modules={cfg.target_modules!r}: {e}. Module names in this model "
            f"include: {', '.join(names[:40])}"
        ) from e


def trainable_summary(model) -> dict[str, int | float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "share": round(trainable / total, 6)}
