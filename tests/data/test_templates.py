import pytest

from lorasft.data.templates import (
    BUILTIN,
    TemplateError,
    adds_bos,
    build_prompt,
    render,
    resolve_template,
)

CONV = [
    {"role": "user", "content": "Add\n\n1 2", "instruction": "Add", "input": "1 2"},
    {"role": "assistant", "content": "3"},
]


@pytest.fixture
def tok(tiny_tokenizer):
    saved = tiny_tokenizer.chat_template
    yield tiny_tokenizer
    tiny_tokenizer.chat_template = saved


def test_alpaca_renders_instruction_input_response(tok):
    tok.chat_template = BUILTIN["alpaca"]
    assert render(CONV, tok, False) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd\n\n### Input:\n1 2\n\n"
        "### Response:\n3<|im_end|>\n\n"
    )
    assert build_prompt(CONV[:1], tok).endswith("### Input:\n1 2\n\n### Response:\n")


def test_chatml_and_plain(tok):
    tok.chat_template = BUILTIN["chatml"]
    assert render(CONV, tok, False) == (
        "<|im_start|>user\nAdd\n\n1 2<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
    )
    assert (
        build_prompt(CONV[:1], tok)
        == "<|im_start|>user\nAdd\n\n1 2<|im_end|>\n<|im_start|>assistant\n"
    )
    tok.chat_template = BUILTIN["plain"]
    assert render(CONV, tok, False) == "Add\n\n1 2\n3<|im_end|>\n"


def test_no_doubled_bos(tok):
    # This tokenizer does not add BOS to plain text, so no template may add one either.
    assert not adds_bos(tok)
    tok.chat_template = BUILTIN["alpaca"]
    ids = tok(build_prompt(CONV[:1], tok), add_special_tokens=False).input_ids
    assert tok.bos_token_id not in ids


def test_resolve(tok):
    own = tok.chat_template
    assert (
        resolve_template("auto", tok) == own
        and resolve_template("chatml", tok) == BUILTIN["chatml"]
    )
    tok.chat_template = None
    assert resolve_template("auto", tok) == BUILTIN["alpaca"]
    with pytest.raises(TemplateError, match="no chat template; use alpaca, chatml or plain"):
        resolve_template("model", tok)
    with pytest.raises(TemplateError, match="expected one of auto, model, alpaca, chatml, plain"):
        resolve_template("vicuna", tok)
