"""`lorasft export --format ollama`: the Modelfile's TEMPLATE, rendered by Go's text/template (as
Ollama renders it: tests/export/ollama_render.go), equals the run's chat template rendered by
lorasft on multi-turn chats; its stop parameters and system prompt are the run's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lorasft.cli import main
from lorasft.data.templates import adds_bos, attach_template, render, with_system
from lorasft.data.tokenize import stop_ids
from lorasft.export.ollama import OllamaError, modelfile
from lorasft.model.load import load_tokenizer
from tests.conftest import QUICK, tiny_args

HERE = Path(__file__).parent
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": "Name?"}],
    [{"role": "user", "content": "第一个问题"}, {"role": "assistant", "content": "答案一"},
     {"role": "user", "content": "第二个问题"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": 'say "{{ .Content }}" \\n'},
     {"role": "assistant", "content": "line 1\nline 2\n"}, {"role": "user", "content": "}}{{"},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "three\n\nturns"}],
    [{"role": "user", "content": "no-break\u00a0space, line\u2028separator, tab\tand \x01"}],
]  # fmt: skip


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Ollama's renderer: Go's text/template, built once (Go from Debian's golang-go, which
    `make test` installs: scripts/install_go.sh)."""
    go = shutil.which("go")
    assert go, "Go is needed to render Ollama templates: scripts/install_go.sh (apt-get golang-go)"
    binary = tmp_path_factory.mktemp("go") / "ollama_render"
    subprocess.run([go, "build", "-o", str(binary), str(HERE / "ollama_render.go")], check=True,
                   timeout=300)  # fmt: skip

    def run(template: str, messages: list[dict]) -> str:
        file = binary.parent / "TEMPLATE"
        file.write_text(template, encoding="utf-8")
        values = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
        out = subprocess.run([str(binary), str(file)], input=json.dumps(values), check=True,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        return out.stdout

    return run


def parsed(text: str) -> tuple[str, str | None, list[str]]:
    """(TEMPLATE, SYSTEM, stops) of a Modelfile."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.MULTILINE | re.DOTALL).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.MULTILINE | re.DOTALL)
    stops = [json.loads(s) for s in re.findall(r"^PARAMETER stop (.*)$", text, re.MULTILINE)]
    return template, system.group(1) if system else None, stops


def as_ollama_sends(messages: list[dict], system: str | None) -> list[dict]:
    """Ollama puts the Modelfile's SYSTEM first when a request has no system message."""
    return with_system(messages, system)


def assert_same(text: str, tok, system: str | None, go_render, chats=CHATS) -> None:
    template, got_system, stops = parsed(text)
    assert got_system == system
    assert stops == tok.convert_ids_to_tokens(stop_ids(tok))
    for chat in chats:
        want = render(with_system(chat, system), tok, add_generation_prompt=True)
        if adds_bos(tok):
            want = want.removeprefix(tok.bos_token)  # llama.cpp adds BOS itself
        assert go_render(template, as_ollama_sends(chat, got_system)) == want, chat


def test_export_ollama_writes_the_gguf_and_a_modelfile_that_renders_as_the_run(
    tiny_llama_dir, tmp_path, go_render
):
    run = tmp_path / "run"
    args = tiny_args(tiny_llama_dir, run, *QUICK, "train.max_steps=1", "data.template=chatml",
                     "data.system_prompt=Be brief.")  # fmt: skip
    assert main(args) == 0
    out = tmp_path / "ollama"
    assert main(["export", str(run), "--format", "ollama", "--out", str(out)]) == 0
    assert (out / "model.gguf").read_bytes()[:4] == b"GGUF"
    text = (out / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./model.gguf\n" in text
    assert_same(text, load_tokenizer(run), "Be brief.", go_render)


@pytest.mark.parametrize("name", ["chatml", "alpaca", "plain"])
def test_builtin_templates(tiny_tokenizer_dir, go_render, name):
    tok = attach_template(load_tokenizer(tiny_tokenizer_dir), name)
    assert_same(modelfile(tok, None, "model.gguf", "run"), tok, None, go_render)


@pytest.mark.slow
def test_the_default_models_own_template_with_its_default_system_block(go_render):
    """SmolLM2's template adds a system message of its own when a chat has none: the TEMPLATE
    writes it too."""
    from lorasft.model.load import resolve_model_path

    tok = attach_template(load_tokenizer(resolve_model_path("default")), "auto")
    text = modelfile(tok, None, "model.gguf", "run")
    assert "You are a helpful AI assistant named SmolLM" in parsed(text)[0]
    assert parsed(text)[2] == ["<|im_end|>"]
    assert_same(text, tok, None, go_render)


def test_a_trimming_template_is_written_with_a_note_and_the_context_length(
    tiny_tokenizer_dir, go_render, capsys
):
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    text = modelfile(tok, None, "model.gguf", "run", num_ctx=16384)
    assert "# note: the run's chat template trims message text" in text
    assert "trims message text" in capsys.readouterr().err
    assert "PARAMETER num_ctx 16384\n" in text
    unpadded = [c for c in CHATS if all(m["content"] == m["content"].strip() for m in c)]
    assert len(unpadded) == 4
    assert_same(text, tok, None, go_render, unpadded)  # text without surrounding whitespace


def test_a_template_that_depends_on_more_than_roles_is_refused(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}{{ loop.index }}. {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")  # fmt: skip
    with pytest.raises(OllamaError, match="depends on more than the roles"):
        modelfile(tok, None, "model.gguf", "run")
    tok.chat_template = "{{ messages[-1]['content'] }}"  # drops every message but the last
    with pytest.raises(OllamaError, match="does not write each message's content once"):
        modelfile(tok, None, "model.gguf", "run")
