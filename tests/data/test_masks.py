"""Loss masks with real templates, literally: two-turn ChatML, SmolLM2's own template (which
adds a system prompt), and a tokenizer that adds BOS. The expected labels are built from the
template's text pieces, independently of how the encoder renders turn by turn."""

import pytest
from tokenizers import processors

from lorasft.data.formats import Example
from lorasft.data.templates import CHATML, attach_template
from lorasft.data.tokenize import IGNORE, encode_conversation, truncate_prompt
from lorasft.model.load import load_tokenizer

TWO_TURNS = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]  # fmt: skip


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(ids, labels) for text pieces, each in the loss or not."""
    ids, labels = [], []
    for text, trained in pieces:
        p = tok(text, add_special_tokens=False).input_ids
        ids += p
        labels += p if trained else [IGNORE] * len(p)
    return ids, labels


def test_two_turn_chatml(tiny_tokenizer):
    enc = encode_conversation(Example("t", TWO_TURNS), tiny_tokenizer)
    ids, labels = expected(tiny_tokenizer, [
        ("<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n", False),
        ("a1<|im_end|>", True),  # the answer through its end-of-turn token
        ("\n<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n", False),  # newline out
        ("a2<|im_end|>", True),
        ("\n", False),
    ])  # fmt: skip
    assert enc.input_ids == ids and enc.labels == labels


@pytest.mark.slow
def test_smollm2_template_with_its_default_system_prompt():
    from lorasft.model.load import resolve_model_path

    tok = attach_template(load_tokenizer(resolve_model_path("default")), "model")
    enc = encode_conversation(Example("t", TWO_TURNS), tok)
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    ids, labels = expected(tok, [
        (system + "<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n", False),
        ("a1<|im_end|>", True),
        ("\n<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n", False),
        ("a2<|im_end|>", True),
        ("\n", False),
    ])  # fmt: skip
    assert enc.input_ids == ids and enc.labels == labels


@pytest.fixture
def bos_tokenizer(tiny_tokenizer_dir):
    """The fixture tokenizer made to start text with BOS, as Llama-2's does."""
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.bos_token = "<|endoftext|>"
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    tok.chat_template = CHATML
    assert tok("a").input_ids[0] == bos
    return tok


def test_one_bos_and_it_survives_truncation(bos_tokenizer):
    tok, bos = bos_tokenizer, bos_tokenizer.bos_token_id
    enc = encode_conversation(Example("t", TWO_TURNS), tok)
    assert enc.input_ids[0] == bos and enc.input_ids.count(bos) == 1 and enc.labels[0] == IGNORE
    cut = truncate_prompt(enc, len(enc) - 5, keep_bos=True)
    assert cut.input_ids[0] == bos and cut.input_ids.count(bos) == 1
    assert cut.input_ids[1:] == enc.input_ids[6:] and cut.labels[1:] == enc.labels[6:]
    answer = tok("a2<|im_end|>", add_special_tokens=False).input_ids
    assert [t for t in cut.labels if t != IGNORE][-len(answer) :] == answer


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_generation_prompts_have_one_bos(bos_tokenizer, template):
    """A tokenizer that adds BOS: the template writes it, the encoders add none."""
    from lorasft.data.templates import BUILTIN
    from lorasft.data.tokenize import prompt_ids

    tok = bos_tokenizer
    tok.chat_template = BUILTIN[template]
    ids = prompt_ids(TWO_TURNS[:3], tok)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert encode_conversation(Example("t", TWO_TURNS), tok).input_ids[: len(ids)] == ids


def test_the_second_turns_prompt_is_the_training_prefix(tiny_tokenizer):
    """What serving sends before the second answer is exactly what training saw before it."""
    from lorasft.data.tokenize import prompt_ids

    enc = encode_conversation(Example("t", TWO_TURNS), tiny_tokenizer)
    prompt = prompt_ids(TWO_TURNS[:3], tiny_tokenizer)
    assert enc.input_ids[: enc.response_start] == prompt and len(prompt) > 10
    assert enc.labels[enc.response_start - 1] == IGNORE != enc.labels[enc.response_start]
