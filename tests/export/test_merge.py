"""`lorasft merge`: the merged folder loads with plain transformers and answers like the adapter."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorasft.cli import main
from lorasft.data.tokenize import stop_ids
from lorasft.model.precision import PRECISION_DTYPES
from lorasft.model.reopen import frozen_dtype, open_run
from tests.conftest import logit_tolerance, precision_of

PROMPT = "<|im_start|>user\nhello world, what is the answer?<|im_end|>\n<|im_start|>assistant\n"


def _logits(model, tok):
    with torch.no_grad():
        return model(torch.tensor([tok(PROMPT).input_ids])).logits.float()


def test_merged_folder_matches_adapter_on_base(tiny_run, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(tiny_run), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    run = open_run(tiny_run)
    tok, peft = run.tok, run.model
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    mtok = AutoTokenizer.from_pretrained(out)
    want = _logits(peft, tok)
    with peft.disable_adapter():
        base = _logits(peft, tok)
    assert (want - base).abs().max() > 1e-2  # the adapter matters, so a lost merge would show
    # The run reopens in the dtype it trained in; the merge is float32 (of the same weights).
    precision = precision_of(tiny_run)
    assert frozen_dtype(peft) == PRECISION_DTYPES[precision]
    assert merged.dtype == torch.float32
    tol = logit_tolerance(precision, want)
    assert (_logits(merged, mtok) - want).abs().max() < tol
    assert mtok.chat_template == tok.chat_template
    assert sorted(merged.generation_config.eos_token_id) == stop_ids(tok)


def test_merge_weights_add_up(tiny_run, tmp_path):
    # The same adapter twice at weight 0.5 adds up to the adapter once, in float32 to float32
    # rounding; at weights 0.5 + 0 it is half of it, which an ignored weight would not give.
    one, halves, half = tmp_path / "one", tmp_path / "halves", tmp_path / "half"
    assert main(["merge", str(tiny_run), "--out", str(one)]) == 0
    assert main(["merge", str(tiny_run), "--also", str(tiny_run), "--weights", "0.5", "0.5",
                 "--out", str(halves)]) == 0  # fmt: skip
    assert main(["merge", str(tiny_run), "--also", str(tiny_run), "--weights", "0.5", "0",
                 "--out", str(half)]) == 0  # fmt: skip
    a, b, c = (AutoModelForCausalLM.from_pretrained(d) for d in (one, halves, half))
    tok = AutoTokenizer.from_pretrained(one)
    assert (_logits(a, tok) - _logits(b, tok)).abs().max() < 1e-5
    assert (_logits(a, tok) - _logits(c, tok)).abs().max() > 1e-2


def test_merge_dtype(tiny_run, tmp_path):
    out = tmp_path / "bf16"
    assert main(["merge", str(tiny_run), "--out", str(out), "--dtype", "bfloat16"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_merge_refuses_bad_input(tiny_run, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("keep me")
    assert main(["merge", str(tiny_run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["merge", str(tiny_run), "--weights", "1", "2", "--out", str(tmp_path / "n")]) == 2
    assert "one per run" in capsys.readouterr().err
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "not a finished lorasft run" in capsys.readouterr().err


def test_merged_config_carries_the_context_extension(tiny_llama_dir, tmp_path):
    import json

    from tests.conftest import QUICK, tiny_args

    run, out = tmp_path / "run", tmp_path / "merged"
    ctx = ["context.target_length=512", "context.method=yarn"]
    assert main(tiny_args(tiny_llama_dir, run, *QUICK, *ctx)) == 0
    assert main(["merge", str(run), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn"
    assert config["rope_parameters"]["original_max_position_embeddings"] == 256
    assert config["max_position_embeddings"] == 512
    # Plain transformers reads the long input exactly as the run does.
    ref = open_run(run).model
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(5, 405).unsqueeze(0)
    with torch.no_grad():
        want = ref(ids).logits.float()
        diff = (merged(ids).logits - want).abs().max()
    assert diff < logit_tolerance(precision_of(run), want)


def test_merge_refuses_adapters_with_different_context(tiny_run, tiny_llama_dir, tmp_path):
    from lorasft.export.merge import merge_runs
    from lorasft.model.load import ModelError
    from tests.conftest import QUICK, tiny_args

    other = tmp_path / "yarn"
    assert (
        main(
            tiny_args(
                tiny_llama_dir, other, *QUICK, "context.target_length=512", "context.method=yarn"
            )
        )
        == 0
    )
    import pytest

    with pytest.raises(ModelError, match="context settings"):
        merge_runs([tiny_run, other])
