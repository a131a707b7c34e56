"""The base model's side of an evaluation (its perplexity and greedy answers), kept for the next
run that evaluates the same base on the same inputs: runs of one base and one eval file, which
differ only in their adapters, compute it once.

The key is everything the base's numbers depend on: the base's weights (file names, sizes,
modification times), its config as loaded (dtype, attention, context extension), the exact token
ids evaluated (so the template, system prompt and truncation are in it), the generation
settings, the device, and the versions of torch, transformers and lorasft. Stored as JSON under
the lorasft cache (`$LORASFT_CACHE/eval`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lorasft.data.tokenize import Encoded
from lorasft.eval import generate
from lorasft.model.load import cache_root, weights_stamp
from lorasft.model.reopen import frozen_dtype
from lorasft.run_files import write_json

FORMAT = 2  # 2: greedy answers as generated one at a time (eval.generate's near-tie check)


def base_key(model, prompts: list[list[int]], encoded: list[Encoded], gen: dict[str, Any]) -> str:
    """The cache key of the base's results for these inputs (`model` is the PEFT-wrapped run)."""
    from importlib.metadata import version

    import torch
    import transformers

    base = model.get_base_model()
    config = base.config.to_dict()
    parts = {
        "format": FORMAT,
        "weights": weights_stamp(str(config.get("_name_or_path", ""))),
        "config": config,
        "dtype": str(frozen_dtype(model)),
        "device": str(base.device),
        "prompts": prompts,
        "encoded": [(e.input_ids, e.labels) for e in encoded],
        "gen": gen,
        "near_tie": [generate.NEAR_TIE_EPS, generate.NEAR_TIE_FLOOR],
        "versions": [torch.__version__, transformers.__version__, version("lorasft")],
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _path(key: str) -> Path:
    return cache_root() / "eval" / f"base-{key}.json"


def load(key: str) -> dict | None:
    try:
        return json.loads(_path(key).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def save(key: str, data: dict) -> None:
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data, indent=None)
