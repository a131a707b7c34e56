"""A GGUF file run by llama.cpp itself (PyPI `llama-cpp-python`, the optional extra `llamacpp`),
for `lorasft verify --llama-cpp`: the runtime users put the file in, not transformers reading it.

The prompt is the run's rendered prompt text, tokenized by llama.cpp with the file's own
tokenizer and BOS flag; generation is greedy over llama.cpp's logits, stopping at the file's
end-of-generation tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lorasft.model.load import ModelError


def file_type(path: Path) -> str:
    """The file's type as llama.cpp names it (F32, F16, Q8_0, Q4_K_M, ...): its
    `general.file_type`, else the most common type among its matrices (norms and other vectors
    stay F32 in every type `lorasft export` writes)."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
            return name.removeprefix("ALL_").removeprefix("MOSTLY_")
        except ValueError:  # a number this gguf-py does not know: read the tensors
            pass
    kinds = [t.tensor_type.name for t in reader.tensors if len(t.shape) > 1]
    return max(set(kinds), key=kinds.count) if kinds else "F32"


class LlamaCpp:
    """One GGUF file in llama.cpp, with every position's logits kept (for divergence margins)."""

    def __init__(self, path: str | Path, n_ctx: int = 2048):
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise ModelError(
                "--llama-cpp needs llama.cpp's Python binding: pip install -e '.[llamacpp]' "
                "(compiled by pip, about 5-8 minutes on 2 cores the first time, then cached)"
            ) from e
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"--llama-cpp {self.path}: no such file")
        threads = max(1, min(4, os.cpu_count() or 1))
        self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, logits_all=True, verbose=False,
                         n_threads=threads, n_threads_batch=threads)  # fmt: skip
        self.type = file_type(self.path)
        meta = self.llm.metadata
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self.chat_template = meta.get("tokenizer.chat_template", "")
        self.stops = sorted({self.llm.token_eos(), *_eot(self.llm)} - {-1})

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True)

    def greedy(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
        """New ids and the logits each was chosen from."""
        self.llm.reset()
        self.llm.eval(ids)
        out, rows = [], []
        for _ in range(max_new_tokens):
            logits = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
            nxt = int(logits.argmax())
            out.append(nxt)
            rows.append(logits)
            if nxt in self.stops:
                break
            self.llm.eval([nxt])
        return out, rows


def _eot(llm) -> list[int]:
    """The end-of-turn token llama.cpp knows for this file, if any (-1 when none)."""
    try:
        return [int(llm._model.token_eot())]
    except AttributeError:
        return []
