"""Merge a run's LoRA adapter(s) into the base weights and save a plain Hugging Face model folder.

The folder needs nothing from lorasft to load: safetensors weights, config, the tokenizer with the
chat template the run trained with, and a generation config whose EOS is the run's stop ids (so
`generate` and vLLM end turns where training did).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorasft.data.tokenize import stop_ids
from lorasft.export import METHODS, PRUNING
from lorasft.model.load import ModelError
from lorasft.model.precision import DTYPE_NAMES
from lorasft.model.reopen import RunSpec, attach, check_same_context, open_run, read_run


def _set_weight(model, adapter: str, weight: float) -> None:
    """Scale one adapter's contribution (`set_scale` keeps alpha / r and multiplies by `weight`)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            module.set_scale(adapter, weight)


def _check_same_base(first: RunSpec, other: RunSpec) -> None:
    if other.cfg.model.path != first.cfg.model.path:
        raise ModelError(
            f"{other.dir}: trained on model.path={other.cfg.model.path!r}, but the first run used "
            f"{first.cfg.model.path!r}; only adapters of the same base can be merged together"
        )
    check_same_context(first, other)


COMBINED = "combined"


def merge_runs(run_dirs: list[str | Path], weights: list[float] | None = None,
               method: str = "linear", density: float | None = None):  # fmt: skip
    """`(spec of the first run, merged float32 model)`. The base is the one the run trained on,
    in the dtype it trained in (a quantized one dequantized), then widened to float32 (exact), so
    the merge adds the adapters to the very weights training saw. Adapters are merged in the
    order given, each scaled by its weight (`method`: see METHODS); config and tokenizer come
    from the first run."""
    if method != "linear":
        spec, model = combine_runs(run_dirs, weights, method, density)
        merged = model.merge_and_unload()
        merged.eval()
        return spec, merged
    weights = _weights(run_dirs, weights)
    first = open_run(run_dirs[0], dequantize=True)  # a QLoRA run's base as the values it trained on
    model = first.model.to(torch.float32)
    _set_weight(model, "default", weights[0])
    merged = model.merge_and_unload()
    for run, weight in zip(run_dirs[1:], weights[1:]):
        spec = read_run(run)
        _check_same_base(first.spec, spec)
        peft = attach(merged, spec)
        _set_weight(peft, "default", weight)
        merged = peft.merge_and_unload()
    merged.eval()
    return first.spec, merged


def new_folder(path: str | Path, flag: str) -> Path:
    """An output folder that is new or empty (nothing of another merge is overwritten)."""
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{flag} {out}: the folder exists and is not empty; choose a new folder")
    return out


def _weights(run_dirs: list, weights: list[float] | None) -> list[float]:
    weights = list(weights) if weights else [1.0] * len(run_dirs)
    if len(weights) != len(run_dirs):
        raise ModelError(
            f"--weights: {len(weights)} weights for {len(run_dirs)} runs; give one per run"
        )
    return weights


def _check_combinable(spec: RunSpec, config, method: str) -> None:
    """What add_weighted_adapter would drop silently: DoRA's magnitudes, and modules trained in
    full next to the adapter (modules_to_save: lm_head, a context's embeddings and norms), for
    which the combined adapter would get the base's untrained copy."""
    if spec.cfg.lora.use_dora:
        raise ModelError(f"{spec.dir} is a DoRA adapter: PEFT's add_weighted_adapter ({method}) "
                         "combines A and B but not DoRA's magnitude vectors; merge it with "
                         "--method linear (each adapter merged exactly, in turn)")  # fmt: skip
    if config.modules_to_save:
        raise ModelError(f"{spec.dir} trained {', '.join(sorted(config.modules_to_save))} in full "
                         f"next to its adapter: PEFT's add_weighted_adapter ({method}) does not "
                         "combine those; merge it with --method linear")  # fmt: skip


def combine_runs(run_dirs: list[str | Path], weights: list[float] | None, method: str,
                 density: float | None = None):  # fmt: skip
    """`(spec of the first run, float32 PeftModel whose active adapter COMBINED is the runs'
    adapters combined by PEFT's add_weighted_adapter)`; the runs' own adapters are removed."""
    if method not in METHODS[1:]:
        raise ModelError(f"--method {method}: expected one of {', '.join(METHODS)}")
    if method in PRUNING and density is None:
        raise ModelError(f"--method {method} prunes each adapter: give --density (0-1], the "
                         "share of each delta's entries kept, e.g. 0.5")  # fmt: skip
    if density is not None and not 0 < density <= 1:
        raise ModelError(f"--density {density}: give a share in (0, 1]")
    weights = _weights(run_dirs, weights)
    first = open_run(run_dirs[0], dequantize=True)
    model, names = first.model.to(torch.float32), ["default"]
    _check_combinable(first.spec, model.peft_config["default"], method)
    for n, run in enumerate(run_dirs[1:], start=1):
        spec = read_run(run)
        _check_same_base(first.spec, spec)
        names.append(f"run{n}")
        attach(model, spec, names[-1])
        _check_combinable(spec, model.peft_config[names[-1]], method)
    torch.manual_seed(0)  # dare_* drop entries at random: the same merge every time
    try:
        model.add_weighted_adapter(names, weights, COMBINED, combination_type=method,
                                   density=density)  # fmt: skip
    except (ValueError, TypeError, RuntimeError) as e:
        runs = ", ".join(str(r) for r in run_dirs)
        raise ModelError(f"--method {method} cannot combine the adapters of {runs}: {e}") from e
    _unit_scale(model)
    model.set_adapter(COMBINED)
    for name in names:
        model.delete_adapter(name)
    return first.spec, model.eval()


def _unit_scale(model) -> None:
    """add_weighted_adapter folds each adapter's own scale into the combined A and B and gives the
    result alpha = r, a scale of 1; but it keeps the first adapter's use_rslora, which would
    scale the sum again by sqrt(r). The combined adapter is a plain one of scale 1."""
    from peft.tuners.lora import LoraLayer

    config = model.peft_config[COMBINED]
    if not config.use_rslora:
        return
    config.use_rslora = False
    for module in model.modules():
        if isinstance(module, LoraLayer) and COMBINED in module.scaling:
            module.scaling[COMBINED] = module.lora_alpha[COMBINED] / module.r[COMBINED]
            module.use_rslora[COMBINED] = False


def write_combined_adapter(run_dirs: list[str | Path], out: str | Path,
                           weights: list[float] | None, method: str,
                           density: float | None = None) -> Path:  # fmt: skip
    """`lorasft merge --adapter-out DIR`: the combined adapter as a run folder of its own (the
    first run's config, run info and tokenizer; the combined adapter), which eval, serve and
    export open as any run."""
    import shutil

    from lorasft.run_files import CONFIG, RUN_INFO

    out = new_folder(out, "--adapter-out")
    if method == "linear":
        raise ModelError(f"--adapter-out needs a --method that builds one adapter "
                         f"({', '.join(METHODS[1:])}); linear merges into the weights")  # fmt: skip
    spec, model = combine_runs(run_dirs, weights, method, density)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, selected_adapters=[COMBINED])
    for f in (out / COMBINED).iterdir():  # PEFT writes a named adapter in its own subfolder
        f.rename(out / f.name)
    (out / COMBINED).rmdir()
    for name in (CONFIG, RUN_INFO):
        shutil.copy2(Path(run_dirs[0]) / name, out / name)
    spec.tok.save_pretrained(out)
    return out


def set_generation_ids(model, tok) -> None:
    gen = model.generation_config
    gen.eos_token_id = stop_ids(tok)
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id


def merge(run_dirs: list[str | Path], out: str | Path, dtype: str = "float32",
          weights: list[float] | None = None, method: str = "linear",
          density: float | None = None) -> Path:  # fmt: skip
    """Write the merged model folder; returns its path."""
    if dtype not in DTYPE_NAMES:
        raise ModelError(f"--dtype {dtype}: expected one of {', '.join(DTYPE_NAMES)}")
    out = new_folder(out, "--out")
    spec, model = merge_runs(run_dirs, weights, method, density)
    tok = spec.tok
    model = model.to(DTYPE_NAMES[dtype])
    set_generation_ids(model, tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
