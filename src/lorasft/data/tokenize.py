"""Tokenize examples into `input_ids` and `labels` from an explicit loss mask.

Labels are never derived by comparing ids with `pad_token_id`: on SmolLM2 and many other models
pad == eos, and that comparison masks out the EOS the model must learn to stop on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorasft.data.formats import Example
from lorasft.data.templates import TemplateError, adds_bos, render

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: str = ""
    response_start: int = 0  # index of the final response's first token

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class EncodeStats:
    records: int = 0
    truncated: int = 0
    dropped_too_long: list[str] = field(default_factory=list)
    windows: int = 0
    text: dict[str, int] = field(default_factory=dict)  # documents, windows, tokens, tail


def _ids(tokenizer, text: str) -> list[int]:
    # Templates add their own special tokens (BOS included), so the tokenizer must not add more.
    return tokenizer(text, add_special_tokens=False).input_ids


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS plus the chat end-of-turn token if distinct."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _response_mask(resp_ids: list[int], stops: list[int], eos: int) -> tuple[list[int], list[bool]]:
    """Train the answer through its end-of-turn token; what the template puts after it (a newline)
    belongs to the next prompt. With no end token in the text, EOS is appended and trained."""
    last = max((i for i, t in enumerate(resp_ids) if t in stops), default=None)
    if last is None:
        return resp_ids + [eos], [True] * (len(resp_ids) + 1)
    return resp_ids, [i <= last for i in range(len(resp_ids))]


def encode_conversation(ex: Example, tokenizer, train_on_prompt: bool = False) -> Encoded:
    """Render turn by turn; each assistant turn is the text between the generation prompt for it
    and the conversation that includes it, so masking follows the real template exactly."""
    stops, eos = stop_ids(tokenizer), tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    response_start = 0
    for i, msg in enumerate(ex.messages):
        if msg["role"] != "assistant":
            continue
        prompt = render(ex.messages[:i], tokenizer, add_generation_prompt=True)
        full = render(ex.messages[: i + 1], tokenizer, add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TemplateError(
                f"{ex.source}: the chat template does not render this conversation as a growing "
                "prefix, so prompt and response cannot be separated; set data.template to "
                "chatml, alpaca or plain"
            )
        p_ids = _ids(tokenizer, prompt[len(done) :])
        r_ids, r_mask = _response_mask(_ids(tokenizer, full[len(prompt) :]), stops, eos)
        response_start = len(ids) + len(p_ids)
        ids += p_ids + r_ids
        mask += [train_on_prompt] * len(p_ids) + r_mask
        done = full
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    return Encoded(ids, labels, ex.source, response_start)


def truncate_prompt(enc: Encoded, max_length: int, keep_bos: bool) -> Encoded | None:
    """Cut the prompt from the left so the final response and its EOS stay whole (BOS kept);
    None when the response alone does not fit."""
    head = 1 if keep_bos else 0
    if len(enc) - enc.response_start + head > max_length:
        return None
    cut = len(enc) - max_length + head
    ids = enc.input_ids[:head] + enc.input_ids[cut:]
    labels = enc.labels[:head] + enc.labels[cut:]
    return Encoded(ids, labels, enc.source, enc.response_start - cut + head)


def document_stream(texts: list[str], tokenizer) -> list[int]:
    """Documents as one token sequence, each ending with EOS (and starting with BOS where the
    tokenizer adds one), so no window reads one document as the continuation of another."""
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    stream: list[int] = []
    for text in texts:
        stream += bos + _ids(tokenizer, text) + [tokenizer.eos_token_id]
    return stream


def text_windows(
    docs: list[Example], tokenizer, max_length: int, keep_tail: bool = True
) -> tuple[list[Encoded], dict[str, int]]:
    """Raw text for continued pre-training: documents tokenized, joined with EOS between them,
    cut into consecutive windows of max_length, every token trained. A window is never filled by
    repeating tokens (that teaches copying); the last, shorter window is kept or dropped."""
    stream = document_stream([ex.text for ex in docs], tokenizer)
    windows, tail = [], 0
    for start in range(0, len(stream), max_length):
        chunk = stream[start : start + max_length]
        if (len(chunk) < max_length and not keep_tail) or len(chunk) < 2:
            tail = len(chunk)  # a single token has nothing to predict
            continue
        windows.append(Encoded(chunk, list(chunk), docs[0].source if len(docs) == 1 else "text"))
    counts = {"documents": len(docs), "windows": len(windows), "tokens": len(stream),
              "tail_dropped_tokens": tail}  # fmt: skip
    return windows, counts


def encode_examples(
    examples: list[Example],
    tokenizer,
    max_length: int,
    truncation: str = "drop",
    train_on_prompt: bool = False,
    keep_tail: bool = True,
) -> tuple[list[Encoded], EncodeStats]:
    stats = EncodeStats(records=len(examples))
    docs = [ex for ex in examples if ex.is_text]
    out, stats.text = text_windows(docs, tokenizer, max_length, keep_tail) if docs else ([], {})
    keep_bos = adds_bos(tokenizer)
    for ex in examples:
        if ex.is_text:
            continue
        enc = encode_conversation(ex, tokenizer, train_on_prompt)
        if len(enc) > max_length:
            enc = (
                truncate_prompt(enc, max_length, keep_bos)
                if truncation == "truncate_prompt"
                else None
            )
            if enc is None:
                stats.dropped_too_long.append(ex.source)
                continue
            stats.truncated += 1
        out.append(enc)
    stats.windows = len(out)
    return out, stats
