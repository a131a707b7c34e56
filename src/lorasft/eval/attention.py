"""Where attention goes on a long input: per layer, the share of attention mass by distance
band and on the first tokens (attention sinks, Xiao et al. 2023).

The eager attention modules return their weights; a forward hook reduces each layer's
[batch, heads, L, L] matrix to a few numbers as soon as it is computed. (`output_attentions=True`
would keep every layer's matrix until the end: 30 layers x 9 heads x 8k x 8k floats is 72 GB.)
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch

from lorasft.eval.sliding import forward_kwargs


def default_bands(length: int) -> list[tuple[int, int]]:
    """[0, 64), [64, 256), [256, 1024), ... by factors of 4, the last band ending at `length`."""
    edges = [0, 64]
    while edges[-1] < length:
        edges.append(edges[-1] * 4)
    edges[-1] = max(length, edges[-2] + 1)
    return list(itertools.pairwise(edges))


def band_shares(weights: torch.Tensor, bands: list[tuple[int, int]], n_sink: int,
                first_query: int) -> dict:  # fmt: skip
    """Shares of the attention mass of queries >= `first_query`, averaged over heads and queries.
    `tril(S, -d)` keeps the entries with distance (query - key) >= d."""
    s = weights[0].float().sum(0)[first_query:]  # [queries, keys], heads summed
    queries = s.size(0)
    norm = s.sum().item()  # = heads * queries: every softmax row sums to 1

    def at_least(d: int) -> float:
        return torch.tril(s, diagonal=first_query - d).sum().item() if d else norm

    shares = [(at_least(lo) - at_least(hi)) / norm for lo, hi in bands]
    return {"bands": [round(x, 5) for x in shares], "sink": round(s[:, :n_sink].sum().item() / norm, 5),
            "queries": queries}  # fmt: skip


def _attention_modules(model) -> list[torch.nn.Module]:
    """The per-layer attention modules: classes named *Attention that hold no other one."""
    found = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    return [m for m in found if not any(c is not m and c in found for c in m.modules())]


@contextmanager
def _recording(modules: list[torch.nn.Module], reduce):
    rows: list[dict] = []

    def hook(_module, _args, output):
        if isinstance(output, tuple) and len(output) > 1 and torch.is_tensor(output[1]):
            rows.append(reduce(output[1]))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def _attn_impl(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "unknown"


@torch.no_grad()
def attention_by_distance(model, ids: list[int], bands: list[tuple[int, int]] | None = None,
                          n_sink: int = 4) -> dict:  # fmt: skip
    """Per layer shares of the mass of the second half of the queries (every band up to half the
    length is reachable from each of them)."""
    if _attn_impl(model) != "eager":
        raise ValueError(f"attention shares need attn_implementation='eager' (this model uses "
                         f"'{_attn_impl(model)}'); switch with model.set_attn_implementation('eager')")  # fmt: skip
    bands = bands or default_bands(len(ids))
    first = len(ids) // 2
    reduce = lambda w: band_shares(w, bands, n_sink, first)
    with _recording(_attention_modules(model), reduce) as rows:
        model(input_ids=torch.tensor([ids], device=model.device), **forward_kwargs(model, 1))
    if not rows:
        raise ValueError(f"{type(model).__name__}: no attention module returned its weights")
    return {"length": len(ids), "bands": [list(b) for b in bands], "n_sink": n_sink,
            "first_query": first, "layers": rows}  # fmt: skip
