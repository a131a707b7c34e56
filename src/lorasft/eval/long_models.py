"""The three models compared by length: the base as trained, the base with the run's context
scaling applied but untrained, and the tuned run. Base variants are loaded one at a time and
freed after use, so at most two models are in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lorasft.config import Config
from lorasft.model.context import ContextPlan, context_window, original_window, plan_context
from lorasft.model.load import model_folder, read_config
from lorasft.model.reopen import base_spec, open_base


def base_config(cfg: Config):
    return read_config(model_folder(cfg.model), cfg.model.trust_remote_code)


def window_and_plan(cfg: Config) -> tuple[int, ContextPlan | None]:
    config = base_config(cfg)
    return original_window(config), plan_context(config, cfg.context)


def load_base_on(cfg: Config, dtype: torch.dtype, scaled: bool):
    """The run's base in `dtype`, with its context scaling (untrained) or without."""
    return open_base(base_spec(cfg, dtype), cfg.context if scaled else None)


def base_variants(cfg: Config, plan: ContextPlan | None,
                  dtype: torch.dtype) -> dict[str, tuple[str, Callable]]:  # fmt: skip
    """name -> (label, loader). No scaled variant when the run has no scaling to apply."""
    out = {"base": ("base, no scaling", lambda: load_base_on(cfg, dtype, False))}
    if plan is not None and plan.method != "none":
        label = f"base + {plan.method} (untrained)"
        out["base_scaled"] = (label, lambda: load_base_on(cfg, dtype, True))
    return out


def position_limit(model) -> int | None:
    """Learned position tables cannot read past their last row; RoPE has no hard limit."""
    if getattr(model.config, "rope_parameters", None):
        return None
    return context_window(model.config)


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Switch to eager attention (the only one that materialises the weights) and back."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = inner.config._attn_implementation
    inner.set_attn_implementation("eager")
    try:
        yield
    finally:
        inner.set_attn_implementation(before)
