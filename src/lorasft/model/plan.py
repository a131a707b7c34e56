"""`lorasft plan`: the model's window, the context method and factor, peak training memory and
seconds per step by sequence length, estimated before launch so an out-of-memory or a week-long
run shows up in seconds.

Memory, in bytes, for batch b, sequence s, L layers, hidden h, heads a, vocab V, base dtype of
p_w bytes and activations of p bytes:

  weights     = P_base * p_w                       (P_base: base parameters, tables extended)
  trainable   = T * 16                             (T: LoRA + modules_to_save parameters, fp32
                                                    weight 4 + gradient 4 + AdamW moments 8)
  layer(s)    = s*b*h*(34 + 5*a*s/h) * p/2         (Korthikanti et al. 2022, arXiv 2205.05198,
                                                    eq. 1, scaled from 16-bit to p bytes) with
                                                    eager attention, which stores the a*s*s
                                                    scores; sdpa, flash attention and S2-Attn
                                                    around them store none: s*b*h*34 * p/2
  logits(s)   = b*s*V*(p + 16) with p = 2, 16*b*s*V with p = 4, all at once (loss_chunk_tokens
                0): the logits (p bytes), their fp32 copy and log-softmax (4 + 4), and in the
                backward pass the fp32 gradients of both (4 + 4); in fp32 the copy is the logits
                themselves. In chunks of c (the default): n = min(b*s, c) positions, whose
                gradient is taken at once: n*V*12 in fp32 (logits, log-softmax, gradient), 16 in
                bf16 (and the 16-bit logits and gradient)
  no checkpointing:   L*layer(s) + logits(s)
  checkpointing:      L*s*b*h*p + layer(s) + logits(s)   (each layer's input kept, one layer
                                                           recomputed at a time), with the
                      chunked loss L*s*b*h*p + max(layer(s), logits(s)): its chunks take their
                      gradients in the forward pass and are gone before any layer is recomputed
  peak = weights + trainable + activations

It counts what the model and training add to the process, not the Python/torch runtime itself
(about 0.45 GB of RSS on CPU), allocator slack, the CUDA context or temporary buffers; with
text (every position in the loss) the logits dominate past a few thousand tokens.

Time per step: matrix products (2 FLOPs per weight per token forward, the same again for the
input gradients, the forward once more under checkpointing; the chunked loss takes each chunk's
gradients in its forward pass, so it adds none) at a matmul rate, plus attention
(causal: 2*s*s*h FLOPs per layer forward, 2*s*G*h with S2-Attn groups of G; backward 2.5x the
forward) at an attention-kernel rate, both rates measured on this machine in about a second.
Element-wise work (norms, activations, the loss) is left out: measured at 2k tokens on CPU it
was about a sixth of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
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
from lorasft.model.lora import peft_targets

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRAINABLE_BYTES = 16
"""Per trainable parameter: fp32 weight, gradient and AdamW's two moments (the docstring's T * 16)."""


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


def layer_activations(s: int, b: int, h: int, a: int, p: int, attention: str = "sdpa") -> int:
    scores = 5 * a * s / h if attention == "eager" else 0
    return int(s * b * h * (34 + scores) * p / 2)


def logits_bytes(s: int, b: int, vocab: int, p: int, chunk: int = 0) -> int:
    """The loss's logits and their fp32 work: all b*s positions at once, or one chunk of them.
    A chunk's gradient is taken while its logits exist, so it holds the logits, their log-softmax
    and the logits' gradient: 12 bytes an entry in fp32 (measured 12.2-12.8 by
    bench/long_context/loss_chunk.py), 16 in bf16 (the bf16 logits and gradient and their fp32 copies)."""
    if chunk > 0:
        return min(b * s, chunk) * vocab * (16 if p == 2 else 12)
    return b * s * vocab * (p + 16 if p == 2 else 16)


def activations(config, s: int, b: int, p: int, checkpointing: bool,
                attention: str = "sdpa", chunk: int = 0) -> int:  # fmt: skip
    h, a, n = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    logits = logits_bytes(s, b, config.vocab_size, p, chunk)
    layer = layer_activations(s, b, h, a, p, attention)
    if not checkpointing:
        return n * layer + logits
    # a chunked loss is done (its gradients taken) before the backward pass recomputes a layer;
    # the whole-vocabulary logits and their gradients live on into it
    return n * s * b * h * p + (max(layer, logits) if chunk > 0 else layer + logits)


def peak_bytes(config, base: int, trainable: int, s: int, b: int, p: int, p_w: int,
               checkpointing: bool, attention: str = "sdpa", chunk: int = 0) -> int:  # fmt: skip
    return (
        base * p_w
        + trainable * TRAINABLE_BYTES
        + activations(config, s, b, p, checkpointing, attention, chunk)
    )


def loss_chunk(cfg: Config) -> int:
    """Positions the loss projects at once (0: all): train.loss_chunk_tokens unless the loss is
    off. Liger and Cut Cross-Entropy hold about one chunk's worth too."""
    return 0 if cfg.train.fused_loss == "off" else cfg.train.loss_chunk_tokens


def choose_micro_batch(model, cfg: Config, length: int, precision: str,
                       budget: int) -> tuple[int, int]:  # fmt: skip
    """The largest divisor of cfg.train.batch_size whose estimated peak at `length` fits `budget`
    bytes, and that peak, for a loaded (LoRA-wrapped) model."""
    config = model.get_base_model().config
    config = getattr(config, "text_config", None) or config
    # the frozen weights' bytes as held (quantized ones packed), counted as 1-byte parameters
    base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    p_w = 1
    p = activation_bytes(precision)
    ckpt, total = cfg.train.gradient_checkpointing, cfg.train.batch_size
    for m in (d for d in range(total, 0, -1) if total % d == 0):
        peak = peak_bytes(config, base, trainable, length, m, p, p_w, ckpt,
                          cfg.model.attn_implementation, loss_chunk(cfg))  # fmt: skip
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
    targets = peft_targets(model, cfg.lora.target_modules)
    match = None if targets == "all-linear" else LoraConfig(target_modules=targets)
    trainable = 0
    for name, module in model.named_modules():
        if name and any(name.endswith(s) for s in saved):
            trainable += sum(p.numel() for p in module.parameters())
        elif _is_lora_target(name, module, match):
            weight = module.weight
            trainable += cfg.lora.r * (weight.shape[0] + weight.shape[1])
    return base, trainable


QUANTIZED_BYTES = {"nf4": 4.127 / 8, "fp4": 4.127 / 8, "int8": 1.0}
"""Bytes per weight of a quantized linear layer: 4 bits plus double-quantized block scales (an
8-bit absmax per 64 weights and an fp32 one per 256 of those: 4.127 bits, the QLoRA paper), or
8 bits (row scales negligible)."""


def base_weight_bytes(config, cfg: Config, base: int, p_w: int) -> int:
    """The frozen base's bytes: `base` parameters of `p_w` bytes, or under model.quantization its
    linear layers (the output head aside, as transformers keeps it) quantized and the rest in
    fp32 (PEFT's preparation for k-bit training casts them)."""
    if cfg.model.quantization == "none":
        return base * p_w
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head
    )
    return int(linear * QUANTIZED_BYTES[cfg.model.quantization]) + (base - linear) * 4


def _is_lora_target(name: str, module: nn.Module, targets: LoraConfig | None) -> bool:
    """Whether PEFT puts LoRA on this module: a 2-D weight, not an embedding or the output head,
    and (`targets` None: all-linear) a name PEFT's own matching takes for `targets`' modules (a
    list's names match the name's last parts, a string the whole name)."""
    if not hasattr(module, "weight") or module.weight is None or module.weight.dim() != 2:
        return False
    if isinstance(module, nn.Embedding) or "lm_head" in name:
        return False
    return targets is None or bool(check_target_module_exists(targets, name))


def memory_table(
    config, cfg: Config, lengths: list[int], precision: str = "fp32"
) -> list[MemoryRow]:
    p = activation_bytes(precision)
    p_w = BYTES.get(cfg.model.dtype, p)
    base, trainable = count_parameters(config, cfg)
    b, att, chunk = cfg.train.batch_size, cfg.model.attn_implementation, loss_chunk(cfg)
    return [
        MemoryRow(
            s,
            base_weight_bytes(config, cfg, base, p_w),
            trainable * TRAINABLE_BYTES,
            activations(config, s, b, p, False, att, chunk),
            activations(config, s, b, p, True, att, chunk),
        )
        for s in lengths
    ]


def base_kind(cfg: Config, precision: str) -> str:
    if cfg.model.quantization != "none":
        return f"{cfg.model.quantization} (QLoRA)"
    return (
        cfg.model.dtype
        if cfg.model.dtype != "auto"
        else {"fp32": "float32"}.get(precision, "16-bit")
    )


def loss_kind(cfg: Config) -> str:
    chunk = loss_chunk(cfg)
    return f"loss in chunks of {chunk}" if chunk else "loss on all positions at once"


def describe_plan(
    config, cfg: Config, precision: str, lengths: list[int] | None = None, timed: bool = True
) -> list[str]:
    ctx: ContextPlan | None = plan_context(config, cfg.context)
    original = ctx.original if ctx else context_window(config)
    lines = [f"model window: {original} tokens"]
    if ctx:
        factor = f", factor {ctx.factor:g}" if ctx.factor else ""
        lines.append(f"context: {ctx.method} to {ctx.target} tokens{factor}")
    lengths = lengths or length_ladder(original, ctx.target if ctx else None)
    rows = memory_table(config, cfg, lengths, precision)
    lines.append(f"LoRA rank {cfg.lora.r} on {cfg.lora.target_modules}: "
                 f"{rows[0].trainable // TRAINABLE_BYTES:,} trainable parameters")  # fmt: skip
    gib = 2**30
    lines.append(
        f"peak memory per sequence length (batch {cfg.train.batch_size}, {precision}, "
        f"{cfg.model.attn_implementation} attention, base {base_kind(cfg, precision)}, "
        f"{loss_kind(cfg)}; GiB):"
    )
    lines.append(
        f"{'length':>8} {'weights':>8} {'lora+opt':>8} {'act':>8} {'act ckpt':>8} {'peak':>8} {'peak ckpt':>9}"
    )
    for r in rows:
        lines.append(
            f"{r.length:>8} {r.weights / gib:>8.3f} {r.trainable / gib:>8.3f} {r.activations / gib:>8.3f} "
            f"{r.activations_checkpointed / gib:>8.3f} {r.peak / gib:>8.3f} {r.peak_checkpointed / gib:>9.3f}"
        )
    return lines + (describe_time(config, cfg, precision, lengths) if timed else [])


def describe_time(config, cfg: Config, precision: str, lengths: list[int]) -> list[str]:
    """Seconds per optimizer step by length, full attention and S2-Attn side by side."""
    from lorasft.model.s2attn import group_tokens

    rates = rates_for(config, precision)
    weights = matmul_parameters(config)
    t, ckpt = cfg.train, cfg.train.gradient_checkpointing
    lines = [(f"seconds per step (batch {t.batch_size} x accum {t.grad_accum}, checkpointing "
             f"{ckpt}; measured here: matmul {rates.matmul / 1e9:.0f} GFLOP/s, attention "
             f"{rates.attention / 1e9:.0f} GFLOP/s; element-wise work not counted):"),
             f"{'length':>8} {'full':>9} {'S2-Attn':>9} {'group':>7}"]  # fmt: skip
    for n in lengths:
        g = group_tokens(cfg.context.s2_group, n)
        full, s2 = (step_seconds(config, n, t.batch_size, span, ckpt, rates, weights)["seconds"]
                    * t.grad_accum for span in (n, g))  # fmt: skip
        lines.append(f"{n:>8} {full:>9.3g} {s2:>9.3g} {g:>7}")
    return lines


# --- time per step ---------------------------------------------------------------------------


@dataclass
class Rates:
    """FLOP/s measured on this machine: dense matmul, and the attention kernel (sdpa causal,
    forward + backward counted as 3.5 forwards)."""

    matmul: float
    attention: float


_RATES: dict[tuple, Rates] = {}


def _seconds(fn, repeat: int = 3) -> float:
    import time

    fn()  # warm-up: kernel selection, allocations
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def measure_rates(dtype: torch.dtype, heads: int, head_dim: int, device: str = "cpu") -> Rates:
    """About a second: a [2048 x h] x [h x 4h] product and causal sdpa on 2048 tokens."""
    key = (dtype, heads, head_dim, device)
    if key in _RATES:
        return _RATES[key]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n, h = 2048, heads * head_dim
    x, w = (
        torch.randn(n, h, dtype=dtype, device=device),
        torch.randn(h, 4 * h, dtype=dtype, device=device),
    )
    matmul = 2 * n * h * 4 * h / _seconds(lambda: (x @ w, sync()))
    q, k, v = (torch.randn(1, heads, n, head_dim, dtype=dtype, device=device, requires_grad=True)
               for _ in range(3))  # fmt: skip

    def attend():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
        sync()

    attention = 3.5 * attention_flops(n, n, h) / _seconds(attend)
    _RATES[key] = Rates(matmul, attention)
    return _RATES[key]


def rates_for(config, precision: str) -> Rates:
    """The rates for this model's attention shape and the run's precision, on the GPU if any."""
    from lorasft.model.precision import PRECISION_DTYPES

    heads = config.num_attention_heads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return measure_rates(PRECISION_DTYPES[precision], heads, config.hidden_size // heads, device)


def attention_flops(s: int, span: int, h: int) -> float:
    """One causal forward of one layer: QK^T and PV over the s*span/2 visible pairs (span = s for
    full attention, the group size for S2-Attn)."""
    return 2 * s * min(span, s) * h


def matmul_parameters(config) -> int:
    """Weights used in matrix products per token: every Linear, the output head included."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def step_seconds(config, s: int, b: int, span: int, checkpointing: bool, rates: Rates,
                 weights: int | None = None) -> dict:  # fmt: skip
    """`weights`: matmul_parameters(config), when the caller has it (it builds a meta model)."""
    n_layers, h = config.num_hidden_layers, config.hidden_size
    head = config.vocab_size * h
    weights = weights or matmul_parameters(config)
    passes = 2 * weights * 2 + (2 * (weights - head) if checkpointing else 0)
    linear = b * s * passes
    attention = n_layers * b * attention_flops(s, span, h) * ((2 if checkpointing else 1) + 2.5)
    return {"matmul_s": linear / rates.matmul, "attention_s": attention / rates.attention,
            "seconds": linear / rates.matmul + attention / rates.attention}  # fmt: skip


def step_plan(cfg: Config, length: int, config=None, rates: Rates | None = None) -> dict:
    """Estimated peak bytes and seconds for one optimizer step at `length` (batch_size x
    grad_accum sequences), for the attention the run trains with."""
    from lorasft.model.load import model_folder, read_config
    from lorasft.model.precision import resolve_precision
    from lorasft.model.s2attn import group_tokens

    if config is None:
        config = read_config(model_folder(cfg.model), cfg.model.trust_remote_code)
    precision, t = resolve_precision(cfg.train.precision), cfg.train
    ckpt = t.gradient_checkpointing
    (row,) = memory_table(config, cfg, [length], precision)
    peak = row.peak_checkpointed if ckpt else row.peak
    span = group_tokens(cfg.context.s2_group, length) if cfg.context.s2_attn else length
    rates = rates or rates_for(config, precision)
    time_parts = step_seconds(config, length, t.batch_size, span, ckpt, rates)
    time_parts = {k: v * t.grad_accum for k, v in time_parts.items()}
    return {"bytes": peak, "attention": "s2" if cfg.context.s2_attn else cfg.model.attn_implementation,
            "span": span, "rates": {"matmul": rates.matmul, "attention": rates.attention},
            **time_parts}  # fmt: skip
