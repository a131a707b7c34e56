"""`lorasft verify --llama-cpp`: the exported GGUF run in llama.cpp itself (llama-cpp-python)
tokenizes the run's prompts to the same ids and answers with the run's greedy tokens."""

import importlib.util

import pytest
import torch

from lorasft.cli import main
from lorasft.export.gguf import write_gguf
from lorasft.model.load import load_model, load_tokenizer
from tests.conftest import PRECISIONS, QUICK, logit_tolerance, tiny_args

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
    from lorasft.model.reopen import open_run

    run = open_run(tiny_run)
    tok = run.tok
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    broken = tmp_path / "template.gguf"
    write_gguf(run.model.merge_and_unload().float(), tok, broken, "f32")
    rc, out = _verify(tiny_run, [broken], capsys, n=2)
    assert rc == 1 and "problem: llama.cpp:f32: chat_template differs" in out


def fast_rope_llama(tiny_llama_dir, out):
    """The tiny Llama made to depend on positions as a trained one does: rope_theta=100 (every
    rotary channel turns within a few hundred positions) and q/k weights 20x larger (a random
    model's attention is otherwise nearly uniform, so positions hardly change its output)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_theta": 100.0}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", ["yarn", "linear"])
def test_extended_run_runs_in_llama_cpp_with_its_scaling(
    method, precision, tiny_llama_dir, tmp_path, capsys
):
    """A run extended from 256 to 512 positions exports its RoPE scaling to GGUF; llama.cpp reads
    it and answers a 450-token text (past the original window) as the run does. Control: the same
    weights without the scaling keys give llama.cpp logits far from the run's."""
    import gguf as gguf_py

    from lorasft.export.llamacpp_verify import LlamaCpp
    from lorasft.export.verify import check_prompt_ids, long_prompts
    from lorasft.model.reopen import open_run

    model_dir = fast_rope_llama(tiny_llama_dir, tmp_path / "model")
    run = tmp_path / "run"
    assert main(tiny_args(model_dir, run, *QUICK, "eval.long=false", "train.learning_rate=1e-2",
                          "context.target_length=512", f"context.method={method}",
                          f"train.precision={precision}")) == 0  # fmt: skip
    out = tmp_path / "x.gguf"
    assert main(["export", str(run), "--out", str(out), "--type", "f32"]) == 0
    fields = gguf_py.GGUFReader(out).fields

    def value(key):
        f = fields[f"llama.{key}"]
        return f.parts[f.data[0]][0]

    assert value("context_length") == 512 and value("rope.scaling.factor") == 2.0
    kind = {"yarn": gguf_py.RopeScalingType.YARN, "linear": gguf_py.RopeScalingType.LINEAR}[method]
    assert bytes(fields["llama.rope.scaling.type"].parts[-1]).decode() == kind.value
    if method == "yarn":
        assert value("rope.scaling.original_context_length") == 256
    capsys.readouterr()
    rc = main(["verify", str(run), "--llama-cpp", str(out), "--num-prompts", "1",
               "--max-new-tokens", "6", "--long", "450"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    long_row = [r.split() for r in text.splitlines() if r.split()[:2] == ["1", "llama.cpp:f32"]]
    assert long_row and long_row[0][2] == "same", text

    opened = open_run(run)
    prompt = check_prompt_ids(long_prompts(opened.tok, 450)[0], opened.tok)
    assert 400 < len(prompt) <= 450
    with torch.no_grad():
        want = opened.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    merged = opened.model.merge_and_unload().float()
    plain = tmp_path / "plain.gguf"
    merged.config.rope_parameters = {"rope_type": "default",
                                     "rope_theta": merged.config.rope_parameters["rope_theta"]}  # fmt: skip
    write_gguf(merged, opened.tok, plain, "f32")
    got = {name: torch.from_numpy(LlamaCpp(path, 1024).greedy(prompt, 1)[1][0])
           for name, path in (("scaled", out), ("plain", plain))}  # fmt: skip
    # llama.cpp keeps K and V in f16 (its default cache type): 2^-11 relative per rounding, a
    # few roundings on the way to the logits; the run's own rounding on top in bf16.
    tol = logit_tolerance(precision, want) + 4 * 2.0**-11 * want.abs().max().item()
    assert (got["scaled"] - want).abs().max().item() <= tol
    assert (got["plain"] - want).abs().max().item() > 3 * tol
