"""Chat templates and the one prompt builder that training, evaluation, generation and serving share.

Built-in templates are Jinja chat templates like the model's own, so a run saves the template it
trained with into its tokenizer files and every later consumer (eval, generate, merge, GGUF,
server) renders prompts from that same string.
"""

from __future__ import annotations

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
