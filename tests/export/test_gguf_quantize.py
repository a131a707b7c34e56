"""`lorasft export --type q4_0|q4_k_m|q5_k_m|q6_k`: llama.cpp's own llama-quantize (built with
llama-server by `make llama-server`) makes the file from lorasft's f32 GGUF; llama.cpp runs it."""

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lorasft.cli import main
from lorasft.export import QUANTIZE
from lorasft.export.gguf import llama_quantize, write_gguf
from lorasft.export.llamacpp_verify import file_type
from lorasft.export.verify import ROUNDING, ROUNDING_SHARE, rounding
from lorasft.model.load import ModelError, load_model, load_tokenizer

QUANTIZER = Path(sys.executable).parent / "llama-quantize"
pytestmark = pytest.mark.skipif(
    not QUANTIZER.is_file() and shutil.which("llama-quantize") is None,
    reason="llama-quantize not built (`make llama-server` builds it; `make test` does)",
)
needs_binding = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama.cpp binding not installed (pip install -e '.[llamacpp]'; `make test` does)",
)
# The type llama.cpp gives most of a 256-wide model's matrices under each file type (its
# llama_tensor_get_type: q4_k_m keeps some layers' V and FFN-down at Q6_K, the output at Q6_K).
MAIN = {"q4_0": "Q4_0", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}


def wide_llama(tokenizer_dir: Path):
    """The tiny Llama with 256-wide rows, so the k-quants' 256-value blocks fit (the suite's
    usual 32-wide model would fall back to 32-block types everywhere)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval(), tok


@pytest.fixture(scope="module")
def wide_files(tiny_tokenizer_dir, tmp_path_factory):
    model, tok = wide_llama(tiny_tokenizer_dir)
    d = tmp_path_factory.mktemp("quantized")
    files = {t: write_gguf(model, tok, d / f"{t}.gguf", t) for t in ("f32", *QUANTIZE)}
    return model, tok, files


@pytest.mark.parametrize("qtype", list(QUANTIZE))
def test_each_type_is_llama_quantizes(wide_files, qtype):
    import gguf

    _, _, files = wide_files
    path = files[qtype]
    reader = gguf.GGUFReader(path)
    want = getattr(gguf.LlamaFileType, f"MOSTLY_{QUANTIZE[qtype]}")
    assert reader.fields["general.file_type"].parts[-1][0] == want
    assert file_type(path) == QUANTIZE[qtype] in ROUNDING_SHARE  # the name verify bounds it by
    kinds = [t.tensor_type.name for t in reader.tensors if len(t.shape) > 1]
    assert max(set(kinds), key=kinds.count) == MAIN[qtype], kinds
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1} == {"F32"}  # norms
    assert path.stat().st_size < 0.3 * files["f32"].stat().st_size  # 4.5-6.6 bits, not 32
    assert not list(path.parent.glob("*.tmp"))  # the f32 source is gone


@needs_binding
def test_llama_cpp_runs_each_type_and_fewer_bits_move_logits_more(wide_files):
    """Each file runs in llama.cpp and gives the f32 file's logits moved by its quantization,
    more for fewer bits. (How far is not this random model's business: its logits are small
    next to what rounding its weights moves, about a quarter of the largest at 4 bits, where a
    trained model's are many times larger; the bounds are measured on the demo.)"""
    from lorasft.export.llamacpp_verify import LlamaCpp

    _, tok, files = wide_files
    ids = tok("hello world, what is the capital of France?", add_special_tokens=False).input_ids
    logits = {t: LlamaCpp(p, 256).greedy(ids, 1)[1][0] for t, p in files.items()}
    moved = {t: float(np.abs(logits[t] - logits["f32"]).max()) for t in QUANTIZE}
    assert 0 < moved["q6_k"] < moved["q5_k_m"] < moved["q4_k_m"] < moved["q4_0"], moved


def test_low_bit_bounds_are_shares_of_the_largest_logit():
    logits = torch.tensor([12.0, -30.0, 4.0])
    assert rounding("Q4_K_M", logits) == pytest.approx(ROUNDING_SHARE["Q4_K_M"] * 30)
    assert rounding("Q4_K_M", logits / 10) == pytest.approx(rounding("Q4_K_M", logits) / 10)
    assert rounding("F16", logits) == rounding("F16", logits / 10) == ROUNDING["F16"]
    assert rounding("IQ1_S", logits) == 0.0  # a type with no bound: every difference counts
    # more bits, a smaller bound (Q5_K_M measured worse than Q4_K_M on the demo: its mix)
    assert ROUNDING_SHARE["Q8_0"] < ROUNDING_SHARE["Q6_K"] < ROUNDING_SHARE["Q4_K_M"] < 1


def test_a_missing_quantizer_is_named_before_anything_is_written(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ModelError, match=r"make llama-server"):
        llama_quantize()
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_run), "--out", str(out), "--type", "q4_k_m"]) == 2
    assert not list(tmp_path.glob("m.gguf*"))


@needs_binding
def test_verify_runs_every_type_and_catches_another_model(tiny_run, tiny_llama_dir, tmp_path,
                                                          capsys):  # fmt: skip
    """`export --type` through the command line for each type, `verify --llama-cpp` on all: the
    run's prompt ids everywhere; q6_k and q5_k_m answer as the run within their bounds. (At 4
    bits the tiny model's own answers part at margins of a few hundredths, as close as another
    model's: its logits are too small to tell the two apart, as a trained model's are not.)
    The untrained base written as if it were the run fails even at q6_k's bound."""
    files = {t: tmp_path / f"{t}.gguf" for t in QUANTIZE}
    for t, path in files.items():
        assert main(["export", str(tiny_run), "--out", str(path), "--type", t]) == 0
    capsys.readouterr()
    argv = ["verify", str(tiny_run), "--num-prompts", "6", "--max-new-tokens", "12"]
    main([*argv, "--llama-cpp", *map(str, files.values())])
    out = capsys.readouterr().out
    rows = [r.split() for r in out.splitlines() if r.split()[1:2] and "llama.cpp:" in r.split()[1]]
    assert sorted({r[1] for r in rows}) == sorted(f"llama.cpp:{t}" for t in QUANTIZE)
    assert len(rows) == 6 * 4 and all(r[2] == "same" for r in rows), out  # prompt ids
    assert all(r[3] in ("same", "tie") for r in rows if r[1] in ("llama.cpp:q6_k",
                                                                 "llama.cpp:q5_k_m")), out  # fmt: skip
    assert main([*argv, "--llama-cpp", str(files["q6_k"]), str(files["q5_k_m"])]) == 0

    base = tmp_path / "base.gguf"
    write_gguf(load_model(tiny_llama_dir), load_tokenizer(tiny_run), base, "q6_k")
    rc = main([*argv, "--llama-cpp", str(base)])
    out = capsys.readouterr().out
    assert rc == 1 and "DIFFER" in out, out
