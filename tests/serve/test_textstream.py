"""Stop strings across token boundaries, and `lorasft serve` argument errors."""

from __future__ import annotations

import pytest

from lorasft.cli import main
from lorasft.serve.textstream import TextCutter


def feed(tok, text: str, stops: list[str]) -> tuple[list[str], TextCutter]:
    cutter, pieces = TextCutter(tok, stops), []
    for t in tok(text, add_special_tokens=False).input_ids:
        pieces.append(cutter.add(t))
        if cutter.stopped:
            break
    pieces.append(cutter.flush())
    return pieces, cutter


def test_stop_string_is_cut_and_never_streamed(tiny_tokenizer):
    pieces, cutter = feed(tiny_tokenizer, "hello world answer question", ["d answ"])
    assert "".join(pieces) == "hello worl" and cutter.stopped
    assert not any("d" in p for p in pieces)  # the held-back "d" was never sent


def test_held_text_is_released_when_no_stop_follows(tiny_tokenizer):
    pieces, cutter = feed(tiny_tokenizer, "hello world", ["world peace"])
    assert "".join(pieces) == "hello world" and not cutter.stopped
    assert pieces[-1].endswith("world")  # held until the end, then flushed


def test_multibyte_characters_are_never_split(tiny_tokenizer):
    pieces, _ = feed(tiny_tokenizer, "从句子中提取人名和城市", [])
    assert "".join(pieces) == "从句子中提取人名和城市" and not any("\ufffd" in p for p in pieces)


class CountingDecoder:
    """A tokenizer's decode, counting the ids it is given."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


def test_a_long_stream_decodes_a_window_per_token_and_joins_to_the_whole(tiny_tokenizer):
    """3000 random ids (special tokens, split and invalid UTF-8 among them): the pieces join to
    the whole answer decoded at once, and each token decodes a few ids, not the answer so far
    (that was 4.5 million ids here, the serving event loop's main work on a long stream)."""
    import random

    rng = random.Random(0)
    ids = [rng.randrange(len(tiny_tokenizer)) for _ in range(3000)]
    counting = CountingDecoder(tiny_tokenizer)
    cutter = TextCutter(counting, [])
    pieces = [cutter.add(i) for i in ids] + [cutter.flush()]
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.decoded < 10 * len(ids), counting.decoded


def test_serve_arguments_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--adapter", "no-equals-sign"])
    assert e.value.code == 2 and "expected NAME=RUN_DIR" in capsys.readouterr().err
    assert main(["serve", "--adapter", f"x={tmp_path}"]) == 2
    assert "is not a finished lorasft run: config.yaml is missing" in capsys.readouterr().err


def test_bytes_become_tokens_that_decode_to_them(tiny_tokenizer):
    """How a held-back character from llama-server's stream is fed on: its bytes as single-byte
    tokens decode to exactly the text; a byte the vocabulary lacks (SmolLM2 has no token for
    0x04) shows as U+FFFD."""
    from lorasft.serve.textstream import _bytes_to_unicode, byte_token_ids, bytes_as_tokens

    by_byte = byte_token_ids(tiny_tokenizer)
    text = "法国的首都 ok é \U0001f600 \x04"
    assert tiny_tokenizer.decode(bytes_as_tokens(by_byte, text.encode())) == text

    class Without04:
        def get_vocab(self):
            vocab = dict(tiny_tokenizer.get_vocab())
            del vocab[_bytes_to_unicode()[4]]
            return vocab

    lacking = byte_token_ids(Without04())
    assert tiny_tokenizer.decode(bytes_as_tokens(lacking, text.encode())) == text[:-1] + "\ufffd"
