"""A run's LoRA adapter as a GGUF LoRA file: the format llama.cpp's convert_lora_to_gguf.py writes
and `llama-server --lora FILE` loads next to the base GGUF, to be switched on per request.

llama.cpp adds `scale * alpha / r * B(A x)` to each targeted matrix, reading `alpha` from the
file and `r` from the shape of A; the tensors are PEFT's own `lora_A` (r x in) and `lora_B`
(out x r), written in F32 (they are small), with B's rows of q/k put in llama.cpp's rotary
layout exactly as the base's q/k rows are. What a GGUF LoRA cannot carry is refused by name:
DoRA, LoRA biases, per-module ranks, and full modules trained next to the adapter
(`modules_to_save`: llama.cpp skips norms in adapters and has no slot for embeddings).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open

from lorasft.export.gguf import check_llama, permute
from lorasft.model.load import ModelError

ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def lora_problems(cfg: dict) -> list[str]:
    """Why this adapter config cannot become a GGUF LoRA (empty: it can)."""
    out = []
    if cfg.get("peft_type") != "LORA":
        out.append(f"peft_type is {cfg.get('peft_type')!r}, not LORA")
    for key, what in (("use_dora", "DoRA (magnitude vectors)"), ("lora_bias", "LoRA biases"),
                      ("fan_in_fan_out", "fan_in_fan_out weights")):  # fmt: skip
        if cfg.get(key):
            out.append(f"{what} ({key}=true)")
    if cfg.get("bias", "none") != "none":
        out.append(f"trained biases (bias={cfg['bias']!r})")
    if cfg.get("modules_to_save"):
        out.append(f"fully trained modules next to the adapter (modules_to_save="
                   f"{cfg['modules_to_save']})")  # fmt: skip
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        out.append("per-module ranks or alphas (rank_pattern/alpha_pattern)")
    if cfg.get("trainable_token_indices") or cfg.get("target_parameters"):
        out.append("trainable tokens or parameters outside LoRA layers")
    return out


def read_adapter_config(run_dir: Path) -> dict:
    path = run_dir / ADAPTER_CONFIG
    if not path.is_file() or not (run_dir / ADAPTER_FILE).is_file():
        raise ModelError(f"{run_dir}: no {ADAPTER_CONFIG} and {ADAPTER_FILE}; give a finished run")
    return json.loads(path.read_text(encoding="utf-8"))


def check_lora(run_dir: Path) -> dict:
    """The adapter config, or a ModelError naming what a GGUF LoRA cannot hold."""
    cfg = read_adapter_config(run_dir)
    problems = lora_problems(cfg)
    if problems:
        raise ModelError(
            f"{run_dir}: this adapter cannot be a GGUF LoRA for llama.cpp: {'; '.join(problems)}. "
            "Serve it with `lorasft serve --engine transformers`, or merge it into a GGUF of its "
            "own with `lorasft export` and serve that file as --base"
        )
    return cfg


def gguf_alpha(cfg: dict) -> float:
    """The alpha llama.cpp must read to scale by PEFT's factor: alpha / r, or alpha / sqrt(r)
    with rsLoRA (llama.cpp always divides by r)."""
    alpha, r = float(cfg["lora_alpha"]), int(cfg["r"])
    return alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha


def lora_tensors(run_dir: Path, config) -> dict[str, np.ndarray]:
    """`{gguf name: array}` for every lora_A/lora_B pair, B's q/k rows permuted as the base's."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    out: dict[str, np.ndarray] = {}
    with safe_open(run_dir / ADAPTER_FILE, "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            m = _KEY.match(key)
            if m is None:
                raise ModelError(f"{run_dir / ADAPTER_FILE}: tensor {key!r} is not a LoRA A/B "
                                 "matrix; a GGUF LoRA holds only those")  # fmt: skip
            module, ab = m["module"], m["ab"]
            target = names.get_name(module)
            if target is None:
                raise ModelError(f"{run_dir}: no GGUF name for the LoRA module {module!r}")
            data = f.get_tensor(key).float().numpy()
            if ab == "B" and module.endswith("q_proj"):
                data = permute(data, heads, heads)
            elif ab == "B" and module.endswith("k_proj"):
                data = permute(data, heads, kv_heads)
            out[f"{target}.weight.lora_{ab.lower()}"] = np.ascontiguousarray(data)
    unpaired = {n.rsplit(".", 1)[0] for n in out} ^ {
        n.rsplit(".", 1)[0] for n in out if n.endswith("lora_a") and n[:-1] + "b" in out
    }
    if unpaired or not out:
        raise ModelError(f"{run_dir}: LoRA matrices without their pair: {sorted(unpaired)[:4]}"
                         if out else f"{run_dir}: the adapter holds no LoRA matrices")  # fmt: skip
    return out


def write_lora_gguf(run_dir: str | Path, config, out: str | Path) -> Path:
    """Write the run's adapter as a GGUF LoRA for the base whose HF `config` it trained on."""
    run_dir, out = Path(run_dir), Path(out)
    check_llama(config)
    cfg = check_lora(run_dir)
    tensors = lora_tensors(run_dir, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(run_dir.name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha(cfg))
    for name, data in tensors.items():
        w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
