"""Context settings travel with a run, and staged runs hand their weights on."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasft.config import load_config
from lorasft.data.prepare import demo_files
from lorasft.model.reopen import open_run
from lorasft.train.pipeline import train
from tests.conftest import LORA_TARGETS, build_model, write_jsonl


def overrides(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    kind = json.loads((model_dir / "config.json").read_text())["model_type"]
    return [f"model.path={model_dir}", f"data.train_file={demo_files()[0]}", "data.eval_file=null",
            "data.val_ratio=0", f"lora.target_modules={LORA_TARGETS[kind]}", f"output.run_dir={run_dir}",
            "train.max_steps=2", "train.batch_size=4", "train.learning_rate=1e-2", "train.precision=fp32",
            "train.eval_strategy=no", "train.early_stopping_patience=null", *extra]  # fmt: skip


@pytest.mark.parametrize("kind,method", [("llama", "yarn"), ("gpt2", "interpolate")])
def test_reloaded_run_gives_the_same_long_input_logits(tmp_path, tiny_tokenizer_dir, kind, method):
    model_dir = build_model(kind, tmp_path / kind, tiny_tokenizer_dir)  # window 256
    cfg = load_config(None, overrides(model_dir, tmp_path / "run", "context.target_length=512",
                                      f"context.method={method}", "context.trainable=[norm]"))  # fmt: skip
    out = train(cfg)
    saved = load_file(out.run_dir / "adapter_model.safetensors")
    assert any("norm" in k or "ln_" in k for k in saved)
    reloaded = open_run(out.run_dir).model
    assert reloaded.get_base_model().config.max_position_embeddings == 512
    ids = torch.randint(3, 500, (1, 450))  # past the original window of 256
    with torch.no_grad():
        mine = out.model.eval()(input_ids=ids).logits
        theirs = reloaded(input_ids=ids).logits
    assert torch.allclose(mine, theirs, atol=1e-5)
    # Without the context settings the same adapter would not even load on GPT-2, and gives
    # other logits on Llama: the check above is not vacuous.
    if kind == "llama":
        assert reloaded.get_base_model().config.rope_parameters["rope_type"] == "yarn"


def lora_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path / "adapter_model.safetensors").items() if "lora_" in k}


def long_text(tmp_path: Path) -> Path:
    """Four 3000-character documents of the demo's words, as raw text records."""
    words = " ".join(Path(demo_files()[0]).read_text(encoding="utf-8").split()[:3000])
    return write_jsonl(
        tmp_path / "long.jsonl", [{"text": words[i : i + 3000]} for i in range(0, 12000, 3000)]
    )


def test_two_stages_hand_weights_on(tmp_path, tiny_llama_dir):
    text = long_text(tmp_path)
    yaml = tmp_path / "staged.yaml"
    yaml.write_text(
        "stages:\n"
        f"  - {{name: short, data: {{train_file: {text}, format: text, max_length: 64}}, train: {{max_steps: 3}}}}\n"
        # lr so small that stage 2 cannot move the weights: what it ends with is what it started from
        f"  - {{name: long, data: {{train_file: {text}, format: text, max_length: 300}},"
        " train: {max_steps: 1, learning_rate: 1.0e-12}}\n",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    cfg = load_config(yaml, overrides(tiny_llama_dir, run, "context.target_length=512"))
    out = train(cfg)
    first, second = lora_weights(run / "stages/1-short"), lora_weights(run / "stages/2-long")
    final = lora_weights(run)
    assert first.keys() == second.keys() == final.keys()
    b = [k for k in first if "lora_B" in k]
    assert all(first[k].abs().sum() > 0 for k in b)  # stage 1 trained (lora_B starts at zero)
    assert all(torch.allclose(first[k], second[k], atol=1e-8) for k in first)
    assert all(torch.equal(second[k], final[k]) for k in first)
    long_cfg = load_config(run / "stages/2-long/config.yaml")
    assert (long_cfg.train.batch_size, long_cfg.train.grad_accum) == (1, 4)
    assert long_cfg.train.gradient_checkpointing and long_cfg.data.max_length == 300
    short_cfg = load_config(run / "stages/1-short/config.yaml")
    assert short_cfg.train.batch_size == 4 and not short_cfg.train.gradient_checkpointing
    assert [s["global_step"] for s in out.info["stages"]] == [3, 1]
    assert {h["stage"] for h in out.log_history} == {"1-short", "2-long"}
    steps = [h["step"] for h in out.log_history]
    assert steps == sorted(steps) and steps[-1] == 4  # one step axis: stage 2 continues from 3


def staged_yaml(tmp_path: Path) -> Path:
    text = long_text(tmp_path)
    yaml = tmp_path / "staged.yaml"
    yaml.write_text(
        "stages:\n"
        f"  - {{name: a, data: {{train_file: {text}, format: text, max_length: 64}}, train: {{max_steps: 3}}}}\n"
        f"  - {{name: b, data: {{train_file: {text}, format: text, max_length: 128}}, train: {{max_steps: 4}}}}\n"
        f"  - {{name: c, data: {{train_file: {text}, format: text, max_length: 96}}, train: {{max_steps: 2}}}}\n",
        encoding="utf-8",
    )
    return yaml


def cut(run: Path, stage: str, keep_checkpoint: int | None) -> None:
    """Leave `run` as a run stopped inside `stage` (the second of three): its later checkpoints,
    its end, the third stage and the run's end removed (keep_checkpoint None: stopped before the
    stage's first checkpoint)."""
    import shutil

    stage_dir = run / "stages" / stage
    for p in (stage_dir / "stage_done.json", stage_dir / "adapter_model.safetensors",
              run / "adapter_model.safetensors", run / "results.json"):  # fmt: skip
        p.unlink()
    for ckpt in (stage_dir / "checkpoints").iterdir():
        if keep_checkpoint is None or int(ckpt.name.split("-")[1]) > keep_checkpoint:
            shutil.rmtree(ckpt)
    shutil.rmtree(run / "stages" / "3-c")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_staged_run_resumes_inside_a_stage_and_between_stages(tmp_path, tiny_llama_dir, precision):
    """Bit for bit, as a single run resumes: stopped after stage b's checkpoint-2 it continues
    from there; stopped before stage b saved anything it starts b from a's adapter; either way
    stage c then starts from b's weights (not from a's, the last stage skipped)."""
    yaml = staged_yaml(tmp_path)
    extra = ["context.target_length=512", f"train.precision={precision}", "lora.dropout=0.1",
             "train.save_steps=2", "train.save_total_limit=null", "eval.long=false",
             "eval.num_samples=0", "eval.compare_base=false"]  # fmt: skip
    full, run = tmp_path / "full", tmp_path / "run"
    train(load_config(yaml, overrides(tiny_llama_dir, full, *extra)))
    train(load_config(yaml, overrides(tiny_llama_dir, run, *extra)))
    want = load_file(full / "adapter_model.safetensors")
    for keep in (2, None):
        cut(run, "2-b", keep)
        out = train(load_config(yaml, overrides(tiny_llama_dir, run, *extra, "train.resume=auto")))
        got = load_file(run / "adapter_model.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), keep
        resumed = out.info["stages"][1]["resumed_from"]
        assert resumed == (str(run / "stages/2-b/checkpoints/checkpoint-2") if keep else None)
        assert [s["global_step"] for s in out.info["stages"]] == [3, 4, 2]
        assert (
            json.loads((run / "results.json").read_text())["train"]["stages"][0]["stage"] == "1-a"
        )
