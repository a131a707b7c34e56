"""Open a run: the one place where a run folder becomes the model that trained.

Every consumer (eval, generate, chat, merge, export, verify, serve, the reload after sharded
training, the long-context evaluation) opens runs here, so each reads the same things from the
run: its config (base path, trust_remote_code, attention, context extension, system prompt), the
dtype its base was held in while training (`lorasft_run.json`, written when training starts), and
its tokenizer with the chat template and stop tokens it trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from lorasft.config import Config, ContextSection, load_config
from lorasft.console import say
from lorasft.data.templates import with_system
from lorasft.data.tokenize import stop_ids
from lorasft.hub import is_hub_id
from lorasft.model.context import apply_context, context_window
from lorasft.model.load import (
    ModelError,
    attention_problem_here,
    load_model,
    load_tokenizer,
    model_folder,
    read_config,
    resolve_model_path,
)
from lorasft.model.precision import DTYPE_NAMES, base_dtype, dtype_name, resolve_precision
from lorasft.run_files import CONFIG, RESULTS, RUN_INFO, write_json


def write_run_info(run_dir: Path, precision: str, dtype: torch.dtype, base_path: Path,
                   quantization: str = "none") -> None:  # fmt: skip
    """What training resolved on its machine, for every later opening on any machine."""
    info = {"precision": precision, "base_dtype": dtype_name(dtype), "base_path": str(base_path),
            "quantization": quantization}  # fmt: skip
    write_json(run_dir / RUN_INFO, info)


def run_config(run_dir: Path, what: str = "run") -> Config:
    for name in (CONFIG, "adapter_config.json"):
        if not (run_dir / name).is_file():
            raise ModelError(f"{what} {run_dir} is not a finished lorasft run: {name} is missing")
    return load_config(run_dir / CONFIG)


def trained_dtype(run_dir: Path, cfg: Config) -> tuple[torch.dtype, str]:
    """The base dtype the run trained with, and where that answer came from."""
    info = run_dir / RUN_INFO
    if info.is_file():
        return DTYPE_NAMES[json.loads(info.read_text())["base_dtype"]], "trained in"
    results = run_dir / RESULTS  # runs from before lorasft_run.json
    precision = json.loads(results.read_text())["train"]["precision"] if results.is_file() else None
    if precision:
        return base_dtype(cfg.model.dtype, precision), "trained in"
    return base_dtype(cfg.model.dtype, resolve_precision(cfg.train.precision)), (
        "not recorded in the run; this machine's choice for its config:"
    )


def usable_attention(attn: str, dtype: torch.dtype) -> str:
    """The run's attention kernel, or sdpa (same results, another kernel) where it cannot run."""
    problem = attention_problem_here(attn, dtype)
    if problem is None:
        return attn
    say(f"the run used {attn}, which cannot run here; opening it with sdpa ({problem})")
    return "sdpa"


@dataclass
class RunSpec:
    """How to open one run (or a bare base), read once from its folder."""

    name: str
    cfg: Config  # the config the model was last trained with (a staged run's last stage)
    base_path: Path
    tok: Any  # the run's tokenizer: its chat template and stop tokens
    dtype: torch.dtype
    attn: str
    dir: Path | None = None  # None for a bare base

    @property
    def quantization(self) -> str:
        """How the base's linear layers are held (model.quantization): none, nf4, fp4, int8."""
        return self.cfg.model.quantization

    @property
    def system_prompt(self) -> str | None:
        return self.cfg.data.system_prompt

    @property
    def stops(self) -> list[int]:
        return stop_ids(self.tok)

    def conversation(self, messages: list[dict], system: str | None = None) -> list[dict]:
        """What the model sees for these messages: the run's system prompt (or `system`) first,
        as training put it on records without one."""
        return with_system(messages, system or self.system_prompt)


def read_run(run_dir: str | Path, dtype: str | None = None, what: str = "run") -> RunSpec:
    """A run's spec; `dtype` (float32/bfloat16/float16) overrides the trained one, said aloud."""
    run = Path(run_dir).expanduser()
    cfg = run_config(run, what)
    trained, source = trained_dtype(run, cfg)
    chosen = trained
    if dtype is not None:
        chosen = DTYPE_NAMES[dtype]
        if chosen != trained:
            say(f"opening {run.name} in {dtype} (--dtype); it trained in {dtype_name(trained)}")
    elif source != "trained in":
        say(f"{run.name}: base dtype {source} {dtype_name(trained)}")
    tok = load_tokenizer(run, cfg.model.trust_remote_code)
    attn = usable_attention(cfg.model.attn_implementation, chosen)
    return RunSpec(run.name, cfg.last_stage(), trained_base(run, cfg), tok, chosen, attn, run)


def trained_base(run_dir: Path, cfg: Config) -> Path:
    """The base folder the run trained on: for a Hub id, the cached snapshot (its commit) that
    training resolved, while it is there (the id's newest snapshot may have moved on since)."""
    info = run_dir / RUN_INFO
    if is_hub_id(cfg.model.path) and info.is_file():
        trained = Path(json.loads(info.read_text())["base_path"])
        if trained.is_dir():
            return trained
    return model_folder(cfg.model)


def read_base(path: str, dtype: str | None = None, trust_remote_code: bool = False,
              quantization: str = "none") -> RunSpec:  # fmt: skip
    """A bare base (no adapter) with its own tokenizer, in the dtype its folder stores (or `dtype`),
    quantized as `quantization` (the runs served on it trained so)."""
    resolved = resolve_model_path(path)
    stored = getattr(read_config(resolved, trust_remote_code), "dtype", None)
    stored = stored if isinstance(stored, torch.dtype) else DTYPE_NAMES.get(str(stored), None)
    chosen = DTYPE_NAMES[dtype] if dtype else (stored or torch.float32)
    cfg = Config.model_validate({"model": {"path": path, "trust_remote_code": trust_remote_code,
                                           "quantization": quantization}})  # fmt: skip
    tok = load_tokenizer(resolved, trust_remote_code)
    return RunSpec(base_name(path), cfg, resolved, tok, chosen, "sdpa")


def base_spec(cfg: Config, dtype: torch.dtype) -> RunSpec:
    """A run's base alone, as its config opens it in `dtype` (for comparisons with the base)."""
    attn = usable_attention(cfg.model.attn_implementation, dtype)
    return RunSpec("base", cfg, model_folder(cfg.model), None, dtype, attn)


def frozen_dtype(model) -> torch.dtype:
    """The dtype a (LoRA-wrapped) model holds its frozen base weights in."""
    return next(p.dtype for n, p in model.named_parameters()
                if "lora_" not in n and p.is_floating_point())  # fmt: skip


def base_name(path: str) -> str:
    if path == "default":
        return "default"
    p = Path(path).expanduser()
    return p.stem if p.suffix.lower() == ".gguf" else p.resolve().name


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_base(spec: RunSpec, context: ContextSection | None = None, dequantize: bool = False):
    """The run's base as it trained (dtype, attention, trust_remote_code, quantization) with
    `context` applied (a PEFT adapter does not carry it; None: none), on the device, in eval mode.
    `dequantize`: a quantized base as plain weights of the values it trained on (merge, export)."""
    if dequantize and spec.quantization != "none":
        say(f"the base trained quantized ({spec.quantization}); dequantizing it to "
            f"{dtype_name(spec.dtype)}: the adapter merges into the weights it trained on")  # fmt: skip
    model = load_model(spec.base_path, dtype=spec.dtype, attn_implementation=spec.attn,
                       trust_remote_code=spec.cfg.model.trust_remote_code,
                       quantization=spec.quantization, dequantize=dequantize)  # fmt: skip
    if context is not None:
        apply_context(model, context)
    return model.to(device()).eval()


@dataclass
class OpenedRun:
    spec: RunSpec
    model: PeftModel

    @property
    def tok(self):
        return self.spec.tok

    @property
    def cfg(self) -> Config:
        return self.spec.cfg

    @property
    def window(self) -> int:
        return context_window(self.model.get_base_model().config)


def open_run(run_dir: str | Path, dtype: str | None = None, dequantize: bool = False) -> OpenedRun:
    """A finished run: its base as trained, with its adapter, ready to generate (`dequantize`: a
    quantized base as plain weights, for merging)."""
    spec = read_run(run_dir, dtype)
    model = attach(open_base(spec, spec.cfg.context, dequantize), spec)
    return OpenedRun(spec, model.to(device()).eval())


def attach(model, spec: RunSpec, name: str = "default"):
    """Load the run's adapter onto `model` (a bare base, or a PeftModel holding other adapters)."""
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(spec.dir, adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, spec.dir, adapter_name=name)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{spec.dir}: the adapter cannot be loaded on this base ({e})") from e


def check_same_context(first: RunSpec, other: RunSpec) -> None:
    """Adapters used together on one base (served or merged) must agree on the context extension:
    it changes the base itself, and a PEFT adapter does not carry it."""
    if other.cfg.context != first.cfg.context:
        raise ModelError(f"{other.dir} was trained with context settings {other.cfg.context} and "
                         f"{first.dir} with {first.cfg.context}; these change the base, so use "
                         "them separately")  # fmt: skip


def shared_base(base: RunSpec, runs: list[RunSpec]) -> None:
    """Adapters served on one base must agree on what changes the base itself."""
    for r in runs:
        check_same_context(runs[0], r)
        if r.quantization != base.quantization:
            raise ModelError(f"{r.dir} trained on a {r.quantization} base and {runs[0].dir} on a "
                             f"{base.quantization} one; serve them separately")  # fmt: skip
        if r.dtype != base.dtype:
            raise ModelError(f"{r.dir} trained in {dtype_name(r.dtype)}, but the base opens in "
                             f"{dtype_name(base.dtype)}; give --dtype to open them alike")  # fmt: skip
        if r.base_path != base.base_path:
            say(f"warning: {r.dir} was trained on {r.base_path}, opened on {base.base_path}")


def read_specs(base: str | None, adapters: list[tuple[str, str]], dtype: str | None = None):
    """One base with several runs' adapters (for serving): `(base spec, run specs)`, checked to
    share what changes the base. The base defaults to the first run's; it opens in the runs'
    dtype."""
    runs = [read_run(d, dtype, what=f"--adapter {name}") for name, d in adapters]
    for (name, _), r in zip(adapters, runs):
        r.name = name
    first = runs[0] if runs else None
    if first is None:
        spec = read_base(base or "default", dtype)
    else:  # the base in the runs' dtype and attention, whatever it is stored in
        spec = read_base(base or first.cfg.model.path, dtype_name(first.dtype),
                         first.cfg.model.trust_remote_code, first.quantization)  # fmt: skip
        spec.attn = first.attn
    shared_base(spec, runs)
    return spec, runs


def served_context(runs: list[RunSpec]) -> ContextSection | None:
    """The context extension every served adapter trained with (None: a bare base)."""
    return runs[0].cfg.context if runs else None


def open_runs(spec: RunSpec, runs: list[RunSpec]):
    """The base of `read_specs` with every run's adapter attached under the run's name."""
    model = open_base(spec, served_context(runs))
    for r in runs:
        model = attach(model, r, r.name)
    return model.to(device()).eval()
