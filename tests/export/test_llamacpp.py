"""`lorasft verify --llama-cpp`: the exported GGUF run in llama.cpp itself (llama-cpp-python)
tokenizes the run's prompts to the same ids and answers with the run's greedy tokens."""

import importlib.util

import pytest

from lorasft.cli import main
from lorasft.export.gguf import write_gguf
from lorasft.model.load import load_model, load_tokenizer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama.cpp binding not installed (pip install -e '.[llamacpp]'; `make test` does)",
)
TYPES = ("f32", "f16", "q8_0")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("llamacpp")
    for t in TYPES:
        assert main(["export", str(tiny_run), "--out", str(d / f"{t}.gguf"), "--type", t]) == 0
    return d


def _verify(run, files, capsys, n=6):
    rc = main(["verify", str(run), "--llama-cpp", *map(str, files), "--num-prompts", str(n),
               "--max-new-tokens", "12"])  # fmt: skip
    return rc, capsys.readouterr().out


def test_llama_cpp_gives_the_runs_answers(tiny_run, exported, capsys):
    rc, out = _verify(tiny_run, [exported / f"{t}.gguf" for t in TYPES], capsys)
    assert rc == 0, out
    rows = [r for r in map(str.split, out.splitlines()) if r[1:2] and r[1].startswith("llama.cpp:")]
    assert len(rows) == 6 * 3 and all(r[2] == "same" for r in rows)  # prompt ids, every one
    f32 = [r for r in rows if r[1] == "llama.cpp:f32"]
    assert all(r[3] == "same" for r in f32)  # f32: the same tokens, no tie needed
    assert "OK: 18/18 prompt-target pairs agree" in out and "problem:" not in out


def test_llama_cpp_catches_another_model(tiny_run, tiny_llama_dir, tmp_path, capsys):
    """The untrained base exported as if it were the run: its answers differ beyond a tie."""
    base = tmp_path / "base.gguf"
    write_gguf(load_model(tiny_llama_dir), load_tokenizer(tiny_run), base, "f32")
    rc, out = _verify(tiny_run, [base], capsys)
    assert rc == 1 and "DIFFER" in out and "first mismatch: prompt" in out


def test_llama_cpp_catches_a_changed_template(tiny_run, exported, tmp_path, capsys):
    from lorasft.model.run import open_run

    run = open_run(tiny_run)
    tok = run.tok
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    broken = tmp_path / "template.gguf"
    write_gguf(run.model.merge_and_unload().float(), tok, broken, "f32")
    rc, out = _verify(tiny_run, [broken], capsys, n=2)
    assert rc == 1 and "problem: llama.cpp:f32: chat_template differs" in out
