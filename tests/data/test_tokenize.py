"""The loss mask, with literal expected arrays: a word-level tokenizer makes every id known."""

import pytest

from lorasft.data.formats import Example
from lorasft.data.templates import BUILTIN, build_prompt
from lorasft.data.tokenize import IGNORE, encode_conversation, encode_examples, text_windows

VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3, "there": 4, "ok": 5, "bye": 6, "now": 7}
HI, THERE, OK, BYE, NOW, EOS = 3, 4, 5, 6, 7, 2
X = IGNORE


@pytest.fixture(scope="module")
def word_tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    # pad == eos, as on SmolLM2: the comparison `labels[ids == pad] = -100` would lose every EOS.
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>", unk_token="<unk>")  # fmt: skip
    tok.chat_template = BUILTIN["plain"]
    return tok


def conv(*turns):
    roles = ["user", "assistant"]
    return Example("f:1", [{"role": roles[i % 2], "content": c} for i, c in enumerate(turns)])


def test_response_and_eos_trained_prompt_masked_even_when_pad_is_eos(word_tok):
    enc = encode_conversation(conv("hi there", "ok"), word_tok)
    assert word_tok.pad_token_id == word_tok.eos_token_id == EOS
    assert enc.input_ids == [HI, THERE, OK, EOS]
    assert enc.labels == [X, X, OK, EOS]
    assert enc.response_start == 2


def test_every_assistant_turn_is_trained(word_tok):
    enc = encode_conversation(conv("hi", "ok", "there", "bye now"), word_tok)
    assert enc.input_ids == [HI, OK, EOS, THERE, BYE, NOW, EOS]
    assert enc.labels == [X, OK, EOS, X, BYE, NOW, EOS]


def test_train_on_prompt(word_tok):
    enc = encode_conversation(conv("hi there", "ok"), word_tok, train_on_prompt=True)
    assert enc.labels == [HI, THERE, OK, EOS]


def test_eos_appended_when_template_has_none(word_tok):
    tok = word_tok
    saved = tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['content'] + '\n' }}{% endfor %}"
    try:
        enc = encode_conversation(conv("hi there", "ok"), tok)
    finally:
        tok.chat_template = saved
    assert enc.input_ids == [HI, THERE, OK, EOS] and enc.labels == [X, X, OK, EOS]


def test_prompt_for_generation_equals_training_prefix(word_tok):
    ex = conv("hi there", "ok")
    prompt_ids = word_tok(
        build_prompt(ex.messages[:1], word_tok), add_special_tokens=False
    ).input_ids
    assert (
        encode_conversation(ex, word_tok).input_ids[: len(prompt_ids)] == prompt_ids == [HI, THERE]
    )


def test_truncation_drop_and_truncate_prompt(word_tok):
    ex = conv("hi", "ok", "there", "bye now")  # 7 tokens, final response 3
    kept, stats = encode_examples([ex], word_tok, max_length=5, truncation="drop")
    assert kept == [] and stats.dropped_too_long == ["f:1"]
    [enc], stats = encode_examples([ex], word_tok, max_length=5, truncation="truncate_prompt")
    assert stats.truncated == 1
    assert enc.input_ids == [EOS, THERE, BYE, NOW, EOS]
    assert enc.labels == [EOS, X, BYE, NOW, EOS]
    assert enc.input_ids[enc.response_start :] == [BYE, NOW, EOS]
    # The response alone (3 tokens) does not fit in 2: dropped even with truncate_prompt.
    kept, stats = encode_examples([ex], word_tok, max_length=2, truncation="truncate_prompt")
    assert kept == [] and stats.dropped_too_long == ["f:1"]


def test_documents_joined_with_eos_cut_into_windows_without_repetition(word_tok):
    docs = [Example("t:1", text="hi there"), Example("t:2", text="ok bye now")]
    windows, counts = text_windows(docs, word_tok, max_length=3)
    stream = [HI, THERE, EOS, OK, BYE, NOW, EOS]
    assert [w.input_ids for w in windows] == [[HI, THERE, EOS], [OK, BYE, NOW]]
    assert [t for w in windows for t in w.input_ids] == stream[:6]  # a prefix: nothing repeated
    assert all(w.labels == w.input_ids for w in windows)
    assert counts == {"documents": 2, "windows": 2, "tokens": 7, "tail_dropped_tokens": 1}
    kept, _ = text_windows(docs, word_tok, max_length=4, keep_tail=True)
    assert [w.input_ids for w in kept] == [[HI, THERE, EOS, OK], [BYE, NOW, EOS]]
    dropped, c = text_windows(docs, word_tok, max_length=4, keep_tail=False)
    assert [w.input_ids for w in dropped] == [[HI, THERE, EOS, OK]] and c[
        "tail_dropped_tokens"
    ] == 3


def test_text_files_are_documents(word_tok, tmp_path):
    from lorasft.data.formats import load_file

    p = tmp_path / "book.txt"
    p.write_text("hi there\nok", encoding="utf-8")
    [ex], bad, rep = load_file(p)
    assert rep.format == "text" and ex.text == "hi there\nok" and bad == []
    enc, stats = encode_examples([ex], word_tok, max_length=8)
    assert enc[0].input_ids == [HI, THERE, OK, EOS] and stats.text["documents"] == 1
