"""`lorasft export RUN --format ollama --out DIR`: the merged GGUF and a Modelfile whose TEMPLATE
renders the run's chat template, with a `PARAMETER stop` for each of the run's stop tokens and the
run's system prompt.

Ollama's TEMPLATE is a Go text/template over `.Messages`, not Jinja, so the run's template is not
translated but measured: rendered on probe conversations with a mark in place of each message's
text, the text between two messages is what the template writes on going from one role to the
next (a system block it adds by default included). The TEMPLATE writes exactly those pieces, as
Go string constants, around each message's content; the derivation is checked on more
conversations before anything is written, and a template it cannot express is an error.
"""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

from lorasft.console import say
from lorasft.data.templates import MARK, TemplateError, adds_bos, render
from lorasft.data.tokenize import stop_ids

START, GENERATE = "", "generate"
# The conversations the pieces are read from, and those the result is checked on.
PROBES = (("system", "user", "assistant", "user"), ("user",))
CHECKS = (("user", "assistant", "user", "assistant", "user"), ("system", "user"),
          ("system", "user", "assistant", "user", "assistant", "user"))  # fmt: skip


class OllamaError(TemplateError):
    """A chat template that an Ollama TEMPLATE cannot reproduce."""


def _render(roles: tuple[str, ...], texts: list[str], tok) -> str:
    messages = [{"role": r, "content": t} for r, t in zip(roles, texts)]
    text = render(messages, tok, add_generation_prompt=True)
    bos = tok.bos_token
    if (
        adds_bos(tok) and bos and text.startswith(bos)
    ):  # llama.cpp adds BOS itself, as the GGUF says
        text = text[len(bos) :]
    return text


def _pieces(roles: tuple[str, ...], tok) -> list[str]:
    """The text around the messages of a conversation of `roles`: before the first, between each
    two, after the last (with the generation prompt)."""
    text = _render(roles, [MARK.format(n) for n in range(len(roles))], tok)
    parts = re.split(r"\ue000\d+\ue001", text)
    if len(parts) != len(roles) + 1 or re.findall(r"\ue000(\d+)\ue001", text) != [
        str(n) for n in range(len(roles))
    ]:
        raise OllamaError("the chat template does not write each message's content once, in "
                          "order; an Ollama TEMPLATE cannot reproduce it")  # fmt: skip
    return parts


def transitions(tok) -> dict[tuple[str, str], str]:
    """(previous role or START, role or GENERATE) -> the text the template writes between."""
    table: dict[tuple[str, str], str] = {}
    for roles in PROBES:
        chain = (START, *roles, GENERATE)
        for pair, text in zip(pairwise(chain), _pieces(roles, tok), strict=True):
            if table.setdefault(pair, text) != text:
                where = pair[0] or "the start"
                raise OllamaError(f"the chat template writes different text between {where} and "
                                  f"{pair[1]} in different conversations")  # fmt: skip
    return table


def rendered_by_table(table: dict[tuple[str, str], str], messages: list[dict]) -> str:
    """What the TEMPLATE renders (the same walk, in Python): the derivation's check."""
    out, prev = "", START
    for m in messages:
        out += table.get((prev, m["role"]), "") + m["content"]
        prev = m["role"]
    return out + table.get((prev, GENERATE), "")


def check_table(table: dict[tuple[str, str], str], tok) -> None:
    for roles in CHECKS:
        texts = [f"{r} text {n}: 1 + 1 = 2" for n, r in enumerate(roles)]
        messages = [{"role": r, "content": t} for r, t in zip(roles, texts)]
        if rendered_by_table(table, messages) != _render(roles, texts, tok):
            raise OllamaError(
                f"the chat template renders {'/'.join(roles)} in a way that depends on more than "
                "the roles of neighbouring messages; an Ollama TEMPLATE derived from it would "
                "differ: serve the GGUF with llama-server (lorasft serve) instead"
            )


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def go_string(text: str) -> str:
    """A Go string constant. Every character Python does not call printable (controls, and
    separators such as U+00A0 or U+2028) is escaped: Ollama's Modelfile reader drops unprintable
    characters from what it reads, and Go reads the escapes back as the characters."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif not ch.isprintable():
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def trims(table: dict[tuple[str, str], str], tok) -> bool:
    """Whether the template changes message text (Llama 3's `| trim`): the TEMPLATE writes
    content as given, so text with surrounding whitespace would render differently."""
    roles = ("user",)
    texts = ["  padded text \n"]
    messages = [{"role": "user", "content": texts[0]}]
    return rendered_by_table(table, messages) != _render(roles, texts, tok)


def go_template(table: dict[tuple[str, str], str]) -> str:
    """Ollama's TEMPLATE: one line of actions, no literal text (so no whitespace trimming)."""
    cases = [(a, b) for (a, b) in table if b != GENERATE and table[(a, b)]]
    out = '{{ $prev := "" }}{{ range .Messages }}'
    for n, (a, b) in enumerate(cases):
        word = "if" if n == 0 else "else if"
        out += (f"{{{{ {word} and (eq $prev {go_string(a)}) (eq .Role {go_string(b)}) }}}}"
                f"{{{{ {go_string(table[(a, b)])} }}}}")  # fmt: skip
    out += "{{ end }}" if cases else ""
    out += "{{ .Content }}{{ $prev = .Role }}{{ end }}"
    for (a, b), text in table.items():
        if b == GENERATE and text:
            out += f"{{{{ if eq $prev {go_string(a)} }}}}{{{{ {go_string(text)} }}}}{{{{ end }}}}"
    return out


def modelfile(tok, system_prompt: str | None, gguf_name: str, run: str,
              num_ctx: int | None = None) -> str:  # fmt: skip
    table = transitions(tok)
    check_table(table, tok)
    lines = [f"# written by lorasft export --format ollama from {run}"]
    if trims(table, tok):
        note = ("the run's chat template trims message text and Ollama's TEMPLATE cannot: a "
                "message with leading or trailing whitespace renders with it")  # fmt: skip
        say(f"warning: {note}")
        lines.append(f"# note: {note}")
    lines += [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(table)}"""']
    if system_prompt:
        odd = [ch for ch in system_prompt if not ch.isprintable() and ch not in "\n\t"]
        if '"""' in system_prompt or odd:
            raise OllamaError('the run\'s system prompt holds """ or unprintable characters '
                              f"({', '.join(map(repr, odd[:3]))}), which a Modelfile's SYSTEM "
                              "cannot hold")  # fmt: skip
        lines.append(f'SYSTEM """{system_prompt}"""')
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    for token in tok.convert_ids_to_tokens(stop_ids(tok)):
        lines.append(f"PARAMETER stop {go_string(token)}")
    return "\n".join(lines) + "\n"


def export_ollama(run_dirs: list[str | Path], out: str | Path, qtype: str = "f32",
                  weights: list[float] | None = None) -> Path:  # fmt: skip
    """DIR/model.gguf (the merged run, as `--format gguf`) and DIR/Modelfile."""
    from lorasft.export.gguf import export_gguf
    from lorasft.model.reopen import read_run

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    spec = read_run(run_dirs[0])
    text = modelfile(spec.tok, spec.cfg.data.system_prompt, "model.gguf", str(run_dirs[0]),
                     spec.cfg.context.target_length)  # fmt: skip
    export_gguf(run_dirs, folder / "model.gguf", qtype, weights)
    (folder / "Modelfile").write_text(text, encoding="utf-8")
    say(f"wrote {folder / 'Modelfile'}: ollama create NAME -f {folder / 'Modelfile'}")  # fmt: skip
    return folder
