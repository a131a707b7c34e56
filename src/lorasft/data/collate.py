"""Batch padding: to the longest record of each batch, never to max_length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorasft.data.tokenize import IGNORE


@dataclass
class PadCollator:
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        ids, labels, mask = [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            if self.padding_side == "left":
                ids.append([self.pad_token_id] * pad + list(f["input_ids"]))
                labels.append([IGNORE] * pad + list(f["labels"]))
                mask.append([0] * pad + [1] * n)
            else:
                ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
                labels.append(list(f["labels"]) + [IGNORE] * pad)
                mask.append([1] * n + [0] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
