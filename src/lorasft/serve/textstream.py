"""Generated token ids to text pieces, cut at the first stop string.

Text is released only once it can no longer become part of a stop string or end inside a
multi-byte character, so a streaming client never receives text that the final answer lacks.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decode gives for an incomplete UTF-8 sequence


class TextCutter:
    """Decodes incrementally: each token decodes a window of a few ids, not the whole answer
    (decoding everything at every token cost O(n^2): a 4000-token stream kept the server's event
    loop busy enough to delay every other request by seconds on a loaded CPU). The window
    starts one settled token back, so a tokenizer that drops a leading space or cleans up
    spaces does so inside the window, as it would in the whole text (the method of Hugging
    Face's text-generation-inference and vLLM)."""

    def __init__(self, tok, stops: list[str] | None):
        self.tok, self.stops = tok, stops or []
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:self._read]
        self._prefix = self._read = 0  # the window: ids[_prefix:], settled up to _read
        self.sent = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """The new text this token makes safe to send ('' if none)."""
        self.ids.append(token_id)
        if not self._settle():  # it ends inside a multi-byte character
            return ""
        text = self.text
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut])
        return self._release(text[: len(text) - self._held(text)])

    def flush(self) -> str:
        """What is left once generation has ended (held text that never became a stop string)."""
        if self.stopped:
            return ""
        self._settle(final=True)
        return self._release(self.text)

    def _settle(self, final: bool = False) -> bool:
        """Decode the window; unless it ends inside a character (and not `final`), add its new
        text to `self.text` and move the window on. False if held."""
        decode = lambda ids: self.tok.decode(ids, skip_special_tokens=True)
        before = decode(self.ids[self._prefix : self._read])
        after = decode(self.ids[self._prefix :])
        if not after.startswith(before):  # a tokenizer whose window text is not its prefix
            if final:
                self.text = decode(self.ids)  # the end: the whole text, as decoded at once
            return final
        if after.endswith(REPLACEMENT) and not final:
            return False
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        return True

    def _release(self, text: str) -> str:
        piece = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return piece

    def _first_stop(self, text: str) -> int | None:
        found = [
            i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0
        ]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that starts some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


def byte_token_ids(tok) -> list[list[int]]:
    """For each byte b, ids that decode to exactly that byte: its single-byte token in a
    byte-level BPE vocabulary. A vocabulary may lack bytes that no UTF-8 text holds (C0, C1,
    F5-FF) or rare control characters; those map to U+FFFD's three byte tokens, which decode
    to the replacement character. A ModelError if even those are missing."""
    from lorasft.model.load import ModelError

    vocab = tok.get_vocab()
    single = [vocab.get(ch) for ch in _bytes_to_unicode()]
    replacement = [single[b] for b in REPLACEMENT.encode("utf-8")]
    if None in replacement:
        raise ModelError("the tokenizer is not byte-level BPE: it has no single-byte tokens")
    return [[i] if i is not None else replacement for i in single]


def bytes_as_tokens(by_byte: list[list[int]], data: bytes) -> list[int]:
    return [i for b in data for i in by_byte[b]]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte (the alphabet of byte-level BPE), by byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    extra, out = 0, []
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out
