"""Chat templates and the one prompt builder that training, evaluation, generation and serving share.

Built-in templates are Jinja chat templates like the model's own, so a run saves the template it
trained with into its tokenizer files and every later consumer (eval, generate, merge, GGUF,
server) renders prompts from that same string.
"""

from __future__ import annotations

import re
from typing import Any

# Each assistant turn ends with eos_token so the tuned model learns to stop.
ALPACA = (
    "{% if add_bos %}{{ bos_token }}{% endif %}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% else %}{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if message.get('input') %}"
    "{{ '### Instruction:\n' + message['instruction'] + '\n\n### Input:\n' + message['input'] + '\n\n' }}"
    "{% else %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

CHATML = (
    "{% if add_bos %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PLAIN = (
    "{% if add_bos %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\n' }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}"
)

BUILTIN = {"alpaca": ALPACA, "chatml": CHATML, "plain": PLAIN}
NAMES = ("auto", "model", *BUILTIN)


class TemplateError(ValueError):
    pass


def resolve_template(name: str, tokenizer) -> str:
    """The Jinja template for data.template: a built-in, or the model's own chat template."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name not in ("auto", "model"):
        raise TemplateError(f"data.template={name!r}: expected one of {', '.join(NAMES)}")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return own
    if name == "model":
        raise TemplateError(
            "data.template=model: this tokenizer has no chat template; use alpaca, chatml or plain"
        )
    return ALPACA


def attach_template(tokenizer, name: str):
    """Give the tokenizer the template a run trains with: saved with the run's tokenizer, it is
    what every later consumer renders prompts from."""
    tokenizer.chat_template = resolve_template(name, tokenizer)
    return tokenizer


def adds_bos(tokenizer) -> bool:
    """Whether this tokenizer starts plain text with BOS (Llama-2 style) or not (GPT-2, SmolLM2)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def render(messages: list[dict[str, Any]], tokenizer, add_generation_prompt: bool) -> str:
    """Render with the tokenizer's chat template (set by the run to the one it trains with)."""
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        add_bos=adds_bos(tokenizer),
    )


def control_tokens(tokenizer) -> list[str]:
    """The tokenizer's special added tokens (`<|im_start|>`, `<|endoftext|>`...): what a template
    writes as markers and what text must never become."""
    found = {str(t) for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted(found, key=len, reverse=True)


def spells_control(text: str, tokens: list[str]) -> str | None:
    """The first of the control `tokens` (`control_tokens`, read once per caller) that `text`
    spells, or None."""
    hits = [(text.find(t), t) for t in tokens if t in text]
    return min(hits)[1] if hits else None


MARK = "\ue000{}\ue001"  # private-use characters around a field's number: no template writes them


def message_texts(messages: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(message index, key) of every text a user wrote: each non-empty string field but the role
    (an empty one stays empty: templates test some, as alpaca's `input`)."""
    return [(i, k) for i, m in enumerate(messages) for k, v in m.items()
            if k != "role" and isinstance(v, str) and v]  # fmt: skip


def render_with_spans(messages: list[dict[str, Any]], tokenizer, add_generation_prompt: bool,
                      ) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    """`render`, and the character spans of the rendered text that came from the messages' text
    (content, and alpaca's instruction/input), so that text can be tokenized as text. Spans are
    found only when some message text spells a control token (else []): the template is rendered
    once more with a numbered mark in place of each text and the marks replaced by the texts (or
    by the texts stripped, as templates that `trim` do); a template that changes message text in
    another way cannot be traced and is an error when a text spells a control token."""
    text = render(messages, tokenizer, add_generation_prompt)
    fields = message_texts(messages)
    tokens = control_tokens(tokenizer)
    forged = [t for i, k in fields if (t := spells_control(messages[i][k], tokens))]
    if not forged:
        return text, []
    marked = [dict(m) for m in messages]
    for n, (i, k) in enumerate(fields):
        marked[i][k] = MARK.format(n)
    template = render(marked, tokenizer, add_generation_prompt)
    for variant in (str, str.strip):
        rebuilt, spans = "", []
        for part in re.split(r"(\ue000\d+\ue001)", template):
            match = re.fullmatch(r"\ue000(\d+)\ue001", part)
            if match:
                i, k = fields[int(match.group(1))]
                part = variant(messages[i][k])
                spans.append((len(rebuilt), len(rebuilt) + len(part)))
            rebuilt += part
        if rebuilt == text:
            return text, [sp for sp in spans if sp[0] < sp[1]]
    raise TemplateError(
        f"a message spells the control token {forged[0]!r} and this chat template changes message "
        "text in a way lorasft cannot trace, so that text cannot be kept as text; remove it from "
        "the message or set data.template to chatml, alpaca or plain"
    )


def build_prompt(messages: list[dict[str, Any]], tokenizer) -> str:
    """The generation prompt for a conversation that ends with a user turn: the exact text that
    precedes an assistant response in training."""
    return render(messages, tokenizer, add_generation_prompt=True)


def with_system(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def prompt_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A training conversation minus its final answer: what a user would send for inference."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
