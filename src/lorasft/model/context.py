"""Context-window extension: RoPE scaling through `config.rope_parameters`, longer learned
position tables, and the extra modules (embeddings, norms) that LongLoRA trains with the adapter.

`apply_context` runs on the bare base model, before LoRA, both when a run trains and when a
finished run is reloaded (a PEFT adapter does not carry these settings). Nothing in transformers
is patched: the RoPE settings go into the model's config and its rotary embedding modules are
rebuilt from it, because they compute their frequencies once, at init.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorasft.config import ConfigError, ContextSection

ROPE_METHODS = ("none", "linear", "dynamic", "yarn", "llama3")
TABLE_METHODS = ("interpolate", "copy", "random")
# Learned absolute position tables: attribute path under the *ForCausalLM model and the number of
# rows the architecture reserves before position 0 (OPT's historical offset of 2).
POSITION_TABLES = {"gpt2": ("transformer.wpe", 0), "opt": ("model.decoder.embed_positions", 2)}
# Llama 3's published values for the frequency bands that llama3 scaling leaves alone / scales.
LLAMA3_BANDS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


@dataclass
class ContextPlan:
    """What `apply_context` does to one model: readable by `lorasft plan` without loading weights."""

    kind: str  # "rope" or "table"
    method: str
    original: int
    target: int
    factor: float | None


def position_kind(config) -> str:
    """`rope`, `table` (learned absolute positions) or a ConfigError for anything else."""
    if config.model_type in POSITION_TABLES:
        return "table"
    if getattr(config, "rope_parameters", None):
        return "rope"
    raise ConfigError(
        f"context.target_length: model type '{config.model_type}' has neither RoPE nor a known "
        f"learned position table ({', '.join(POSITION_TABLES)}); remove the context section"
    )


def resolve_method(kind: str, method: str) -> str:
    """`linear` on a learned table is its analogue, `interpolate`; other mismatches are errors."""
    if kind == "table" and method == "linear":
        return "interpolate"
    valid = ROPE_METHODS if kind == "rope" else TABLE_METHODS
    if method not in valid:
        what = "RoPE" if kind == "rope" else "a learned absolute position table"
        raise ConfigError(
            f"context.method={method!r}: this model uses {what}; use one of {', '.join(valid)}"
        )
    return method


def plan_context(config, ctx: ContextSection) -> ContextPlan | None:
    """Check the context section against a model config; None when no extension is asked for."""
    if ctx.target_length is None:
        return None
    kind = position_kind(config)
    method = resolve_method(kind, ctx.method)
    original = original_window(config)
    if ctx.target_length <= original:
        raise ConfigError(
            f"context.target_length={ctx.target_length}: the model's window is already {original}; "
            "give a longer target or remove the context section"
        )
    if ctx.factor is not None and (kind == "table" or method == "none"):
        raise ConfigError(
            f"context.factor={ctx.factor}: only scaled RoPE methods take a factor; remove it"
        )
    factor = (
        None if kind == "table" or method == "none" else ctx.factor or ctx.target_length / original
    )
    return ContextPlan(kind, method, original, ctx.target_length, factor)


def original_window(config) -> int:
    """The window of a model that lorasft has not extended (a ConfigError for one already scaled)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(
            f"context: the model already uses rope_type={rope['rope_type']!r}; scaling it again "
            "is not supported (remove the context section)"
        )
    return context_window(config)


WINDOW_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def context_window(config) -> int:
    """The number of positions a model reads, context extension included: the one answer that
    training, evaluation, planning, export and serving use.

    Every method but dynamic NTK sets max_position_embeddings to the target; dynamic keeps it at
    the trained window (its scaling starts past it), so its window is that times the factor.
    """
    n = next((getattr(config, k) for k in WINDOW_FIELDS if isinstance(getattr(config, k, None), int)),
             None)  # fmt: skip
    if n is None:
        where = getattr(config, "_name_or_path", "") or config.model_type
        raise ConfigError(
            f"{where}: config.json has none of {', '.join(WINDOW_FIELDS)}, so the model's "
            "context window is unknown; add max_position_embeddings (the number of positions it "
            "was trained on) to its config.json"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "dynamic" and rope.get("factor"):
        return int(n * float(rope["factor"]))
    return int(n)


def base_window(model_path, trust_remote_code: bool = False) -> int:
    """The window a base was trained with, read from its folder (a loaded run's config already
    carries the context extension)."""
    from lorasft.model.load import read_config

    return context_window(read_config(model_path, trust_remote_code))


def length_ladder(original: int, target: int | None) -> list[int]:
    """The lengths that planning and evaluation by length report: half the window (at least 16),
    then doublings from the window up to the target, then the target."""
    lengths, n = [max(16, original // 2)], original
    while target is not None and n < target:
        lengths.append(n)
        n *= 2
    return [*lengths, target if target is not None and target > original else original]


def rope_parameters(rope: dict, plan: ContextPlan) -> dict:
    """The new `rope_parameters` dict: the model's own (rope_theta kept) plus the scaling keys
    that transformers' `ROPE_INIT_FUNCTIONS[rope_type]` reads."""
    params = dict(rope)
    if plan.method == "none":
        return params
    params.update(rope_type=plan.method, factor=float(plan.factor))
    if plan.method in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = plan.original
    if plan.method == "llama3":
        params.update(LLAMA3_BANDS)
    return params


def apply_rope(model, plan: ContextPlan) -> None:
    config = model.config
    config.rope_parameters = rope_parameters(config.rope_parameters, plan)
    # Dynamic NTK grows the base once an input passes max_position_embeddings, so that field must
    # stay the trained window; every other method reads positions up to the target.
    if plan.method != "dynamic":
        config.max_position_embeddings = plan.target
    rebuilt = rebuild_rotary(model)
    if not rebuilt and plan.method != "none":
        raise ConfigError(
            f"context.method={plan.method!r}: no rotary embedding module found in "
            f"{type(model).__name__}; this architecture cannot be scaled by lorasft"
        )


def rebuild_rotary(model) -> int:
    """Replace every rotary embedding module by a new one built from the (changed) config."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq")
    ]
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fresh = type(module)(config=module.config)
        setattr(parent, attr, fresh.to(module.inv_freq.device))
    return len(found)


def extend_table(weight: torch.Tensor, rows: int, method: str, offset: int = 0) -> torch.Tensor:
    """A position table of `rows` positions (plus `offset` reserved rows) from a trained one.

    interpolate: row j of the new table is the trained table read at position j * (n-1)/(rows-1),
    linearly between neighbours (the absolute-position analogue of position interpolation).
    copy: the trained rows tiled. random: trained rows kept, new rows N(0, 0.02 * trained std).
    """
    head, trained = weight[:offset], weight[offset:].float()
    n = trained.shape[0]
    if method == "interpolate":
        pos = torch.linspace(0, n - 1, rows, dtype=torch.float64)
        lo = pos.floor().long().clamp(max=n - 2)
        frac = (pos - lo).unsqueeze(1).float()
        new = trained[lo] * (1 - frac) + trained[lo + 1] * frac
    elif method == "copy":
        new = trained[torch.arange(rows) % n]
    elif method == "random":
        extra = torch.randn(rows - n, trained.shape[1]) * trained.std() * 0.02
        new = torch.cat([trained, extra])
    else:
        raise ConfigError(f"context.method={method!r}: expected one of {', '.join(TABLE_METHODS)}")
    return torch.cat([head, new.to(weight.dtype)])


def apply_table(model, plan: ContextPlan) -> None:
    path, offset = POSITION_TABLES[model.config.model_type]
    table: nn.Embedding = model.get_submodule(path)
    with torch.no_grad():
        new = extend_table(table.weight.data, plan.target, plan.method, offset)
    table.weight = nn.Parameter(new, requires_grad=table.weight.requires_grad)
    table.num_embeddings = new.shape[0]
    model.config.max_position_embeddings = plan.target  # GPT-2 maps n_positions onto this


def apply_context(model, ctx: ContextSection) -> ContextPlan | None:
    """Extend a bare (not yet LoRA-wrapped) model in place; None when the section is off."""
    plan = plan_context(model.config, ctx)
    if plan is None:
        return None
    if plan.kind == "rope":
        apply_rope(model, plan)
    else:
        apply_table(model, plan)
    return plan


def context_modules_to_save(model, ctx: ContextSection) -> list[str]:
    """Module names to train in full and save with the adapter: the new position rows (a learned
    table must train to be any use) and the LongLoRA extras named by `context.trainable`."""
    if ctx.target_length is None:
        return []
    names: list[str] = []
    table = POSITION_TABLES.get(model.config.model_type)
    if table:
        names.append(table[0].rsplit(".", 1)[-1])
    if "embed" in ctx.trainable:
        names.append(_leaf_name(model, model.get_input_embeddings()))
    if "norm" in ctx.trainable:
        names += norm_names(model)
    return list(dict.fromkeys(names))


def norm_names(model) -> list[str]:
    """Leaf names of the normalisation layers (`input_layernorm`, `norm`, `ln_1`, `final_layer_norm`...)."""
    leaves = [
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"))
    ]
    return list(dict.fromkeys(leaves))


def _leaf_name(model, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]
