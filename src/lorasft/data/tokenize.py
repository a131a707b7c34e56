"""Tokenize examples into `input_ids` and `labels` from an explicit loss mask.

Labels are never derived by comparing ids with `pad_token_id`: on SmolLM2 and many other models
pad == eos, and that comparison masks out the EOS the model must learn to stop on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lorasft.data.formats import Example
from lorasft.data.templates import (
    TemplateError,
    adds_bos,
    control_tokens,
    render,
    render_with_spans,
)

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


def text_ids(tokenizer, text: str) -> list[int]:
    """`text` as text: a control token it spells (`<|im_end|>`) becomes the pieces of its
    characters, never the control token."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def _markers(text: str, tokens: list[str], spans: list[tuple[int, int]]) -> list[tuple[int, str]]:
    """(position, token) of each control token the template wrote: matched leftmost-longest, as
    the tokenizer does, in the text between message spans only."""
    found, pattern = [], re.compile("|".join(map(re.escape, tokens)))
    edges = [0, *(x for sp in spans for x in sp), len(text)]
    for begin, end in zip(edges[::2], edges[1::2], strict=True):  # the stretches outside spans
        found += [(m.start(), m.group()) for m in pattern.finditer(text, begin, end)]
    return found


def rendered_ids(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[int]:
    """Token ids of a rendered conversation whose message text lies at `spans` (sorted, apart):
    the template's own control tokens are control tokens, and what the messages spell is text.
    Without spans, exactly the tokenizer's ids. The text between two markers is tokenized as one
    piece, as the tokenizer does, so ids equal its own wherever no message spells a marker."""
    if not spans:
        return _ids(tokenizer, text)
    ids, pos = [], 0
    for at, token in _markers(text, control_tokens(tokenizer), spans):
        ids += text_ids(tokenizer, text[pos:at]) if at > pos else []
        ids.append(tokenizer.convert_tokens_to_ids(token))
        pos = at + len(token)
    return ids + (text_ids(tokenizer, text[pos:]) if pos < len(text) else [])


def _piece_ids(
    tokenizer, text: str, begin: int, end: int, spans: list[tuple[int, int]]
) -> list[int]:
    """`rendered_ids` of text[begin:end], the spans cut to it."""
    inside = [
        (max(b, begin) - begin, min(e, end) - begin) for b, e in spans if b < end and e > begin
    ]
    return rendered_ids(tokenizer, text[begin:end], inside)


def prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """The generation prompt of a conversation ending with a user turn, as ids: what training
    puts before an answer, with the messages' text as text. Every path that turns a request or a
    record into a prompt (generate, chat, eval, serve on every engine, verify) calls this."""
    return rendered_ids(tokenizer, *render_with_spans(messages, tokenizer, True))


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
    turns = [i for i, m in enumerate(ex.messages) if m["role"] == "assistant"]
    # where the messages' text lies in the last answer's rendering, of which every prompt and
    # answer below is a piece (the growing-prefix check): that text is tokenized as text
    try:
        whole, spans = (
            render_with_spans(ex.messages[: turns[-1] + 1], tokenizer, False) if turns else ("", [])
        )
    except TemplateError as e:
        raise TemplateError(f"{ex.source}: {e}") from None
    for i in turns:
        prompt = render(ex.messages[:i], tokenizer, add_generation_prompt=True)
        full = render(ex.messages[: i + 1], tokenizer, add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt) and whole.startswith(full)):
            raise TemplateError(
                f"{ex.source}: the chat template does not render this conversation as a growing "
                "prefix, so prompt and response cannot be separated; set data.template to "
                "chatml, alpaca or plain"
            )
        p_ids = _piece_ids(tokenizer, whole, len(done), len(prompt), spans)
        r_ids = _piece_ids(tokenizer, whole, len(prompt), len(full), spans)
        r_ids, r_mask = _response_mask(r_ids, stops, eos)
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
    for text in texts:  # a control token the text spells is text: only the joins are EOS
        stream += bos + text_ids(tokenizer, text) + [tokenizer.eos_token_id]
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
