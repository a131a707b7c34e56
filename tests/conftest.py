"""Fixtures: a small tokenizer and 2-layer Llama / GPT-2 / OPT models built from configs.

Nothing is downloaded. The byte-level BPE tokenizer is trained here on the package's demo data,
so it covers English and Chinese; its eos is `<|im_end|>` and pad == eos, as on SmolLM2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    from lorasft.data.prepare import demo_files

    lines = []
    for path in demo_files():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            lines += [rec["instruction"], rec["input"], rec["output"]]
    lines += ["### Instruction:", "### Input:", "### Response:", ("Below is an instruction that "
              "describes a task. Write a response that appropriately completes the request."),
              "user assistant system hello world answer question"]  # fmt: skip
    return lines


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )  # fmt: skip
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out)
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from lorasft.model.load import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def _config(kind: str, vocab: int, tok, positions: int = 256):
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=positions, **ids)  # fmt: skip
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=positions, **ids
        )
    return OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=positions,
                     word_embed_proj_dim=32, **ids)  # fmt: skip


def build_model(kind: str, out: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind, len(tok), tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=["llama", "gpt2", "opt"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_model(request.param, tmp_path_factory.mktemp(request.param), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_model("llama", tmp_path_factory.mktemp("llama"), tiny_tokenizer_dir)


LORA_TARGETS = {"llama": "[q_proj,v_proj]", "gpt2": "[c_attn]", "opt": "[q_proj,v_proj]"}


PNG = b"\x89PNG\r\n\x1a\n"

# Settings that make a tiny run quick: no evaluation during or after training.
QUICK = ["eval.num_samples=0", "eval.compare_base=false", "train.eval_strategy=no",
         "train.early_stopping_patience=null", "train.load_best_model_at_end=false"]  # fmt: skip


def tiny_args(model_dir, run_dir, *extra):
    from lorasft.data.prepare import demo_files

    train, evals = demo_files()
    kind = json.loads((model_dir / "config.json").read_text())["model_type"]
    return ["train", f"model.path={model_dir}", f"data.train_file={train}", f"data.eval_file={evals}",
            f"lora.target_modules={LORA_TARGETS[kind]}", f"output.run_dir={run_dir}",
            "train.max_steps=4", "train.eval_steps=2", "train.batch_size=4", "train.learning_rate=1e-3",
            "eval.num_samples=3", "eval.max_new_tokens=6",
            # The tests' learning rates were set for rank 8; NEFTune's noise is scaled for real
            # embeddings and swamps a random tiny model's (lorasft's defaults: tests/test_config.py)
            "lora.r=8", "lora.alpha=16", "data.augment.neftune_noise_alpha=null", *extra]  # fmt: skip


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8"
    )
    return path


# --- Precision legs -------------------------------------------------------------------------
# Every parity test runs in fp32 and in bf16 (forced with train.precision; emulated on a CPU
# without AVX512-BF16/AMX, native on one with it and on GPUs), each with a tolerance argued from
# its dtype rather than one loosened until green.
PRECISIONS = ["fp32", "bf16"]
BF16_U = 2.0**-8  # bf16 keeps 8 significant bits: unit roundoff 2^-8 (one ulp = 2u relative)


def precision_of(run_dir: Path) -> str:
    """The precision a finished run trained in (what `open_run` reopens it in)."""
    return json.loads((Path(run_dir) / "lorasft_run.json").read_text())["precision"]


def logit_tolerance(precision: str, reference: torch.Tensor) -> float:
    """How far two computations of the same weights may put logits apart.

    fp32: only the summation order differs, ~1e-7 relative per op; 1e-4 absolute is far above that
    and far below what a lost adapter or a wrong weight moves (> 1e-2 in these tests).
    bf16: the reference rounds every activation to bf16 (relative error u per rounding); a
    2-layer model rounds about 8 times on the way to the logits, so 8u of the largest logit.
    """
    if precision == "fp32":
        return 1e-4
    return 8 * BF16_U * reference.abs().max().item()


def adapter_difference(a: dict, b: dict) -> float:
    """Largest relative (Frobenius) difference between two adapters' LoRA tensors."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item() for k in a)


def adapter_tolerance(precision: str) -> float:
    """Two trainings that differ only in how the batch was split (processes, micro-batches).

    fp32: summation order only; 1e-5 relative (measured 2e-7 to 3e-7).
    bf16: the base's activations are rounded to bf16 and a different split changes the order of
    the sums before that rounding, so single elements move by one ulp (2u); the gradients and the
    adapter after a few Adam steps move by at most that order in norm: 2u = 0.78% relative
    (measured: 2 processes 8e-4 to 1e-3, micro-batches 7e-5). Controls, also measured: the same
    run in the other precision differs by 1.7%, and one that trained on half of each batch (a
    rank's gradient lost) by 58%.
    """
    return 1e-5 if precision == "fp32" else 2 * BF16_U


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Each test runs in its own folder: a run that falls back to `runs/<name>-<time>` (or fails
    after making it) never lands in the checkout."""
    monkeypatch.chdir(tmp_path)
