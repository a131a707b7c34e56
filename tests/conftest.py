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


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8"
    )
    return path
