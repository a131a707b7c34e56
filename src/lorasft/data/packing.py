"""Packing: several records per row, best-fit decreasing, attention kept inside each record.

A row carries `position_ids` that restart at 0 for every record and no attention mask; from
that, transformers builds a block-diagonal causal mask (masking_utils.find_packed_sequence_indices),
so no record attends to another. With flash attention (GPU) the batch is flattened into one row
and the record boundaries go to the variable-length kernel instead (`PackedCollator(flatten=True)`). The first label of every record is masked: it would otherwise
be predicted from the previous record's last token. With that, the loss of a packed batch equals
the loss of the same records unpacked.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from lorasft.config import ConfigError
from lorasft.data.tokenize import IGNORE, Encoded

# Architectures whose attention mask is built from position_ids when no mask is given (verified
# by tests/data/test_packing.py). OPT, for one, derives positions from the mask and would let
# packed records attend to each other.
PACKING_MODELS = ("llama", "gpt2")


class PackingError(ConfigError):
    pass


def check_packing(model_type: str) -> None:
    if model_type not in PACKING_MODELS:
        raise PackingError(
            f"data.packing=true is not supported for model type '{model_type}' (verified: "
            f"{', '.join(PACKING_MODELS)}); set data.packing=false"
        )


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, longest items first, each into the fullest bin it still fits."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), kept sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            space, b = free.pop(pos)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pack(encoded: list[Encoded], max_length: int) -> list[PackedRow]:
    rows = []
    for members in best_fit_decreasing([len(e) for e in encoded], max_length):
        ids, labels, pos = [], [], []
        for i in members:
            e = encoded[i]
            ids += e.input_ids
            labels += [IGNORE] + e.labels[1:]
            pos += list(range(len(e)))
        rows.append(PackedRow(ids, labels, pos))
    return rows


class PackedCollator:
    """Pads packed rows to the longest row; the padding is a sequence of its own (positions
    restart at 0) that nothing attends to and the loss ignores.

    With `flatten` (for flash attention on GPU) the whole batch becomes one row with no padding
    at all, plus the boundaries flash attention's variable-length kernel takes (`cu_seq_lens_*`,
    `max_length_*`; transformers passes them to the attention), so each record attends to itself
    only and no compute goes to padding or to attention across records."""

    def __init__(self, pad_token_id: int, flatten: bool = False):
        self.pad_token_id, self.flatten = pad_token_id, flatten

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.flatten:
            return flatten(features)
        width = max(len(f["input_ids"]) for f in features)
        ids, labels, pos = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE] * pad)
            pos.append(list(_positions(f)) + list(range(pad)))
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(pos),
        }


def _positions(f: dict[str, Any]):
    return f.get("position_ids") or range(len(f["input_ids"]))  # eval rows: one record


def flatten(features: list[dict[str, Any]]) -> dict[str, Any]:
    ids, labels, pos = [], [], []
    for f in features:
        ids += f["input_ids"]
        labels += f["labels"]
        pos += _positions(f)
    starts = [i for i, p in enumerate(pos) if p == 0]
    for i in starts:  # a record's first token would be predicted from the one before it
        labels[i] = IGNORE
    bounds = torch.tensor([*starts, len(ids)], dtype=torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([pos]),
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": longest,
        "max_length_k": longest,
    }
