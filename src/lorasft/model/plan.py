"""`lorasft plan`: the model's window, the context method and factor, and peak training memory per
sequence length, estimated before launch so an out-of-memory shows up in seconds, not hours.

The estimate, in bytes, for batch b, sequence s, L layers, hidden h, heads a, vocab V, base
dtype of p_w bytes and activations of p bytes:

  weights     = P_base * p_w                       (P_base: base parameters, tables extended)
  trainable   = T * 16                             (T: LoRA + modules_to_save parameters, fp32
                                                    weight 4 + gradient 4 + AdamW moments 8)
  layer(s)    = s*b*h*(34 + 5*a*s/h) * p/2         (Korthikanti et al. 2022, arXiv 2205.05198,
                                                    eq. 1, scaled from 16-bit to p bytes)
  logits(s)   = 2 * b*s*V*4                        (fp32 logits and their gradient)
  no checkpointing:   L*layer(s) + logits(s)
  checkpointing:      L*s*b*h*p + layer(s) + logits(s)   (each layer's input kept, one layer
                                                           recomputed at a time)
  peak = weights + trainable + activations

The 5*a*s/h term stores the attention scores, as eager (and SDPA's math path) do; flash and
memory-efficient SDPA kernels keep none, so for them it overestimates, and more so the longer s.
It ignores allocator slack, the CUDA context and temporary buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lorasft.config import Config, ConfigError
from lorasft.model.context import (
    ContextPlan,
    context_modules_to_save,
    context_window,
    length_ladder,
    plan_context,
)

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def activation_bytes(precision: str) -> int:
    """Bytes per activation value: 16-bit under bf16/fp16 training, else 32-bit."""
    return 2 if precision in ("bf16", "fp16") else 4


@dataclass
class MemoryRow:
    length: int
    weights: int
    trainable: int
    activations: int
    activations_checkpointed: int

    @property
    def peak(self) -> int:
        return self.weights + self.trainable + self.activations

    @property
    def peak_checkpointed(self) -> int:
        return self.weights + self.trainable + self.activations_checkpointed


def layer_activations(s: int, b: int, h: int, a: int, p: int) -> int:
    return int(s * b * h * (34 + 5 * a * s / h) * p / 2)


def activations(config, s: int, b: int, p: int, checkpointing: bool) -> int:
    h, a, n = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    logits = 2 * b * s * config.vocab_size * 4
    layer = layer_activations(s, b, h, a, p)
    if checkpointing:
        return n * s * b * h * p + layer + logits
    return n * layer + logits


def peak_bytes(config, base: int, trainable: int, s: int, b: int, p: int, p_w: int,
               checkpointing: bool) -> int:  # fmt: skip
    return base * p_w + trainable * 16 + activations(config, s, b, p, checkpointing)


def choose_micro_batch(model, cfg: Config, length: int, precision: str,
                       budget: int) -> tuple[int, int]:  # fmt: skip
    """The largest divisor of cfg.train.batch_size whose estimated peak at `length` fits `budget`
    bytes, and that peak, for a loaded (LoRA-wrapped) model."""
    config = model.get_base_model().config
    config = getattr(config, "text_config", None) or config
    frozen = [p for p in model.parameters() if not p.requires_grad]
    base = sum(p.numel() for p in frozen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    p_w = frozen[0].element_size() if frozen else 4
    p = activation_bytes(precision)
    ckpt, total = cfg.train.gradient_checkpointing, cfg.train.batch_size
    for m in (d for d in range(total, 0, -1) if total % d == 0):
        peak = peak_bytes(config, base, trainable, length, m, p, p_w, ckpt)
        if peak <= budget:
            return m, peak
    raise ConfigError(
        f"train.memory_budget_gib: even a micro-batch of 1 at {length} tokens needs about "
        f"{peak / 2**30:.2f} GiB (estimate), over the budget of {budget / 2**30:.2f} GiB; "
        + ("lower data.max_length or raise the budget" if ckpt else
           "set train.gradient_checkpointing=true, lower data.max_length or raise the budget")
    )  # fmt: skip


def count_parameters(config, cfg: Config) -> tuple[int, int]:
    """(base parameters after context extension, trainable parameters), counted on a meta model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    base = sum(p.numel() for p in model.parameters())
    plan = plan_context(config, cfg.context)
    if plan is not None and plan.kind == "table":
        base += (plan.target - plan.original) * config.hidden_size
    saved = [*(cfg.lora.modules_to_save or []), *context_modules_to_save(model, cfg.context)]
    trainable = 0
    for name, module in model.named_modules():
        if name and any(name.endswith(s) for s in saved):
            trainable += sum(p.numel() for p in module.parameters())
        elif _is_lora_target(name, module, cfg.lora.target_modules):
            weight = module.weight
            trainable += cfg.lora.r * (weight.shape[0] + weight.shape[1])
    return base, trainable


def _is_lora_target(name: str, module: nn.Module, targets) -> bool:
    if not hasattr(module, "weight") or module.weight is None or module.weight.dim() != 2:
        return False
    if isinstance(module, nn.Embedding) or "lm_head" in name:
        return False
    if targets == "all-linear":
        return True
    return any(name.endswith(t) for t in targets)


def memory_table(
    config, cfg: Config, lengths: list[int], precision: str = "fp32"
) -> list[MemoryRow]:
    p = activation_bytes(precision)
    p_w = BYTES.get(cfg.model.dtype, p)
    base, trainable = count_parameters(config, cfg)
    b = cfg.train.batch_size
    return [
        MemoryRow(
            s,
            base * p_w,
            trainable * 16,
            activations(config, s, b, p, False),
            activations(config, s, b, p, True),
        )
        for s in lengths
    ]


def describe_plan(config, cfg: Config, precision: str) -> list[str]:
    ctx: ContextPlan | None = plan_context(config, cfg.context)
    original = ctx.original if ctx else context_window(config)
    lines = [f"model window: {original} tokens"]
    if ctx:
        factor = f", factor {ctx.factor:g}" if ctx.factor else ""
        lines.append(f"context: {ctx.method} to {ctx.target} tokens{factor}")
    rows = memory_table(
        config, cfg, length_ladder(original, ctx.target if ctx else None), precision
    )
    gib = 2**30
    lines.append(
        f"peak memory per sequence length (batch {cfg.train.batch_size}, {precision}; GiB):"
    )
    lines.append(
        f"{'length':>8} {'weights':>8} {'lora+opt':>8} {'act':>8} {'act ckpt':>8} {'peak':>8} {'peak ckpt':>9}"
    )
    for r in rows:
        lines.append(
            f"{r.length:>8} {r.weights / gib:>8.3f} {r.trainable / gib:>8.3f} {r.activations / gib:>8.3f} "
            f"{r.activations_checkpointed / gib:>8.3f} {r.peak / gib:>8.3f} {r.peak_checkpointed / gib:>9.3f}"
        )
    return lines
