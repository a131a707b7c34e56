"""A randomly initialised Llama-architecture model of about 1.1B parameters (TinyLlama's shape,
with the default model's 49,152-token tokenizer), written as a Hugging Face folder: something
the size of the models people train, to hold `lorasft plan`'s memory formula against on a CPU.
Nothing is downloaded; the weights are noise (memory and time do not depend on them).

    python bench/long_context/random_model.py OUT_DIR        # ~4.3 GB of fp32 safetensors
    python bench/long_context/long_step.py --lengths 512 2048 --attention s2 --set model.path=OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lorasft.model.load import load_tokenizer, resolve_model_path

SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
         "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 4096,
         "rope_theta": 10000.0, "tie_word_embeddings": False}  # fmt: skip


def write(out: Path) -> int:
    tok = load_tokenizer(resolve_model_path("default"))
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPE)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    n = write(p.parse_args().out)
    print(f"{n:,} parameters")
