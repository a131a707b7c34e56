"""Write a merged Llama-architecture model as GGUF (llama.cpp, Ollama, transformers' GGUF loader).

Tensor names, the q/k permutation and the tokenizer keys follow llama.cpp's convert_hf_to_gguf.py,
which is also what transformers' GGUF loader undoes on load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

from lorasft.console import say
from lorasft.data.templates import adds_bos
from lorasft.export import GGUF_TYPES, QUANTIZE, WRITTEN
from lorasft.model.context import context_window
from lorasft.model.load import CONVERTED_MARK, ModelError

TYPES = dict(zip(WRITTEN, (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16,
                           gguf.LlamaFileType.MOSTLY_Q8_0)))  # fmt: skip


def check_llama(config) -> None:
    if config.model_type != "llama":
        raise ModelError(
            f"GGUF export supports the llama architecture (SmolLM2, Llama, TinyLlama); this model is "
            f"{config.model_type!r}. Merge it with `lorasft merge` and convert that folder with "
            "llama.cpp's convert_hf_to_gguf.py instead"
        )
    rope_scaling(config)  # raises for a scaling llama.cpp cannot reproduce
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelError("GGUF export: llama models with attention or MLP biases are not supported")


# RoPE scaling that llama.cpp applies from GGUF metadata alone (convert_hf_to_gguf.py writes the
# same keys): linear (position interpolation) and YaRN. Dynamic NTK has no llama.cpp counterpart
# for llama models, and llama3 needs a rope_freqs tensor that lorasft does not write.
GGUF_ROPE = {"linear": gguf.RopeScalingType.LINEAR, "yarn": gguf.RopeScalingType.YARN}
YARN_KEYS = {"beta_fast": "add_rope_scaling_yarn_beta_fast",
             "beta_slow": "add_rope_scaling_yarn_beta_slow"}  # fmt: skip
# Attention-scale settings that llama.cpp derives its own way (it applies YaRN's 0.1*ln(factor)+1
# itself): a model carrying them is refused rather than exported with another scale.
UNSUPPORTED_YARN = ("attention_factor", "mscale", "mscale_all_dim")


def rope_scaling(config) -> dict | None:
    """The model's RoPE scaling (None for none), checked to be one llama.cpp reproduces."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind not in GGUF_ROPE:
        raise ModelError(
            f"GGUF export: rope_type {kind!r} has no llama.cpp equivalent for llama models "
            f"(it supports {', '.join(GGUF_ROPE)}); train the run with context.method=yarn or "
            "linear to export it, or serve it with `lorasft serve --engine transformers`"
        )
    extra = [k for k in UNSUPPORTED_YARN if rope.get(k) is not None]
    if extra:
        raise ModelError(
            f"GGUF export: rope_parameters sets {', '.join(extra)}, which llama.cpp does not read "
            "the way transformers does; export needs YaRN's default attention scale"
        )
    return rope


def write_rope_scaling(w: gguf.GGUFWriter, config) -> None:
    rope = rope_scaling(config)
    if rope is None:
        return
    kind = rope.get("rope_type", rope.get("type"))
    w.add_rope_scaling_type(GGUF_ROPE[kind])
    w.add_rope_scaling_factor(float(rope["factor"]))
    if kind == "yarn":
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in YARN_KEYS.items():
            if rope.get(key) is not None:
                getattr(w, add)(float(rope[key]))


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write_hparams(w: gguf.GGUFWriter, config, name: str, ftype: gguf.LlamaFileType) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_name(name)
    w.add_context_length(context_window(config))
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_rope_dimension_count(head_dim)
    write_rope_scaling(w, config)
    w.add_key_length(head_dim)  # as llama.cpp's converter writes them: explicit, not derived
    w.add_value_length(head_dim)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(ftype)


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return (
        weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


def _encode(data: np.ndarray, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Norms and other 1-D tensors stay f32, as llama.cpp keeps them; q8_0 falls back to f16 for
    rows that do not split into 32-value blocks."""
    if data.ndim == 1 or qtype == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == "q8_0" and data.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), q), q
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_tensors(w: gguf.GGUFWriter, model, qtype: str) -> None:
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ModelError(f"GGUF export: no GGUF name for tensor {hf_name}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, config.num_attention_heads, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, config.num_attention_heads, config.num_key_value_heads)
        data, raw = _encode(data, qtype)
        quantized = raw == gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=raw if quantized else None)


def pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the way this tokenizer.json splits text."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    raise ModelError(
        f"GGUF export: the tokenizer's pre-tokenizer {kinds} has no known llama.cpp name; "
        "supported: byte-level BPE as in GPT-2 and SmolLM2"
    )


def _token_types(tok, n: int) -> list[int]:
    """As llama.cpp's converter marks them: special tokens (and added tokens flagged special)
    CONTROL, other added tokens USER_DEFINED, the rest NORMAL."""
    special = set(tok.all_special_ids)
    added = tok.added_tokens_decoder
    types = []
    for i in range(n):
        if i in special or (i in added and added[i].special):
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return types


def source_pre_type(base_path: Path | None) -> str | None:
    """The pre-tokenizer name of the GGUF a base was converted from: transformers' GGUF loader
    turns e.g. `smollm` into a plain byte-level pre-tokenizer, which would read back as `gpt-2`."""
    marker = base_path / CONVERTED_MARK if base_path else None
    if marker is None or not marker.is_file():
        return None
    source = Path(json.loads(marker.read_text())["source"])
    if not source.is_file():
        return None
    field = gguf.GGUFReader(source).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode() if field else None


def write_tokenizer(w: gguf.GGUFWriter, tok, vocab_size: int, pre: str | None = None) -> None:
    """A byte-level BPE vocabulary (tokenizer.ggml.model = gpt2) with the run's chat template."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        kind = spec["model"]["type"]
        raise ModelError(f"GGUF export: only byte-level BPE tokenizers are supported, not {kind}")
    by_id = {i: t for t, i in tok.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise ModelError(
            f"GGUF export: the tokenizer has {len(by_id)} tokens but the model only {vocab_size} rows"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or pre_tokenizer(spec))
    w.add_token_list(tokens)
    w.add_token_types(_token_types(tok, vocab_size))
    w.add_token_merges(merges)
    for add, tid in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                     (w.add_unk_token_id, tok.unk_token_id), (w.add_pad_token_id, tok.pad_token_id)):  # fmt: skip
        if tid is not None:
            add(tid)
    w.add_add_bos_token(adds_bos(tok))
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def llama_quantize() -> str:
    """llama.cpp's `llama-quantize`: the one beside this Python (`make llama-server` installs it
    into the venv with llama-server, from the same source), else the one on PATH."""
    beside = Path(sys.executable).parent / "llama-quantize"
    found = str(beside) if beside.is_file() else shutil.which("llama-quantize")
    if found is None:
        raise ModelError(
            f"--type {', '.join(QUANTIZE)} need llama.cpp's llama-quantize: `make llama-server` "
            "builds it into .venv/bin beside llama-server (or put a llama-quantize on PATH); "
            f"{', '.join(WRITTEN)} need nothing more"
        )
    return found


def quantize(quantizer: str, source: Path, out: Path, qtype: str) -> str:
    """`llama-quantize source out TYPE`; returns its fallback line (how many tensors took a
    32-block type because their rows do not split into 256-value blocks), or ''."""
    args = [quantizer, str(source), str(out), QUANTIZE[qtype]]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr or done.stdout)[-1500:]
        raise ModelError(f"llama-quantize {QUANTIZE[qtype]} failed ({done.returncode}): {tail}")
    text = done.stdout + done.stderr
    return next((line.strip() for line in text.splitlines() if "fallback" in line), "")


def write_gguf(model, tok, out: str | Path, qtype: str = "f32", name: str = "lorasft",
               pre: str | None = None) -> Path:  # fmt: skip
    """Write `model` (a merged, float Llama) and `tok` to one GGUF file: types of TYPES
    directly, those of QUANTIZE as an f32 file beside `out` that llama-quantize reads."""
    if qtype not in GGUF_TYPES:
        raise ModelError(f"--type {qtype}: expected one of {', '.join(GGUF_TYPES)}")
    check_llama(model.config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if qtype in QUANTIZE:
        quantizer = llama_quantize()  # before writing anything
        source = out.with_name(out.name + ".f32.tmp")
        try:
            write_gguf(model, tok, source, "f32", name, pre)
            fallback = quantize(quantizer, source, out, qtype)
        finally:
            source.unlink(missing_ok=True)
        if fallback:
            say(f"llama-quantize {QUANTIZE[qtype]}: {fallback}")
        return out
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    write_hparams(w, model.config, name, TYPES[qtype])
    write_tokenizer(w, tok, model.config.vocab_size, pre)
    write_tensors(w, model, qtype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def export_gguf(run_dirs: list[str | Path], out: str | Path, qtype: str = "f32",
                weights: list[float] | None = None) -> Path:  # fmt: skip
    """Merge the run's adapter into its base (float32) and write the GGUF file."""
    from lorasft.export.merge import merge_runs

    if qtype in QUANTIZE:
        llama_quantize()  # before the merge
    spec, model = merge_runs(run_dirs, weights)
    name, pre = Path(run_dirs[0]).name, source_pre_type(spec.base_path)
    path = write_gguf(model, spec.tok, out, qtype, name=name, pre=pre)
    say(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {qtype})")
    return path
