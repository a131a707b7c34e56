"""Context settings travel with a run, and staged runs hand their weights on."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasft.config import load_config
from lorasft.data.prepare import demo_files
from lorasft.model.run import open_run
from lorasft.train.run import train
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


def test_two_stages_hand_weights_on(tmp_path, tiny_llama_dir):
    words = " ".join(Path(demo_files()[0]).read_text(encoding="utf-8").split()[:3000])
    text = write_jsonl(
        tmp_path / "long.jsonl", [{"text": words[i : i + 3000]} for i in range(0, 12000, 3000)]
    )
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
