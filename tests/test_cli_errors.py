"""Bad input a user can give: each one a clear error (exit 2) or a counted skip."""

import json
import subprocess
import sys

import pytest

from lorasft.cli import main
from tests.conftest import write_jsonl


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_unknown_config_key(capsys):
    rc, err = run(capsys, "train", "train.lr=1e-4")
    assert rc == 2 and "unknown key 'train.lr'" in err


def test_missing_and_broken_models(capsys, tmp_path, tiny_llama_dir):
    rc, err = run(capsys, "train", f"model.path={tmp_path / 'nope'}")
    assert rc == 2 and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run(capsys, "train", f"model.path={empty}")
    assert rc == 2 and "has no config.json" in err
    (empty / "config.json").write_text("{not json")
    rc, err = run(capsys, "train", f"model.path={empty}")
    assert rc == 2 and "config.json: not valid JSON" in err
    (empty / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    rc, err = run(capsys, "train", f"model.path={empty}")
    assert rc == 2 and "has no weights" in err
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    rc, err = run(capsys, "train", f"model.path={txt}")
    assert rc == 2 and "is a file but not a .gguf" in err


def test_bad_data_is_an_error_naming_the_record(capsys, tmp_path, tiny_llama_dir):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}],
    )
    rc, err = run(capsys, "train", f"model.path={tiny_llama_dir}", f"data.train_file={data}")
    assert rc == 2 and f"{data}:2: instruction: must be a string, got int" in err
    assert "data.on_bad_record=skip" in err


def test_every_record_too_long(capsys, tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "word " * 50, "output": "b"}] * 3)
    rc, err = run(
        capsys,
        "train",
        f"model.path={tiny_llama_dir}",
        f"data.train_file={data}",
        "data.max_length=16",
        "data.val_ratio=0",
        "data.dedup=false",
    )
    assert rc == 2 and "no training sequences left" in err and "data.max_length=16" in err


def test_data_check_reports_and_exits_non_zero_on_bad_data(capsys, tmp_path, tiny_llama_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"instruction": "hi", "output": "there"}\n{"instruction": "x", "output": ""}\n'
    )
    rc = main(["data", "check", str(data), f"model.path={tiny_llama_dir}", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and report["records"] == 1
    assert report["bad_records"] == [f"{data}:2: output: empty response"]
    assert report["example"].endswith("[[there<|im_end|>]]\n")
    good = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "hi", "output": "there"}])
    assert main(["data", "check", str(good), f"model.path={tiny_llama_dir}"]) == 0
    out = capsys.readouterr().out
    assert "share in the loss" in out and "[[there<|im_end|>]]" in out


def test_resume_path_without_checkpoint(capsys, tmp_path, tiny_llama_dir):
    rc, err = run(capsys, "train", f"model.path={tiny_llama_dir}", f"train.resume={tmp_path}")
    assert rc == 2 and "no complete checkpoint found" in err


@pytest.mark.parametrize(
    "argv", [["eval", "/nonexistent/run"], ["generate", "/nonexistent/run", "--prompt", "x"]]
)
def test_not_a_run(capsys, argv):
    rc, err = run(capsys, *argv)
    assert rc == 2 and "is not a finished lorasft run" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--lengths", "0"], "at least 2 tokens"), (["--lengths", "64", "--stride", "100"], "--stride 100"),
     (["--depths", "50"], "fractions from 0 to 1"), (["--trials", "0"], "--trials 0: must be at least 1")],
)  # fmt: skip
def test_bad_long_eval_arguments(capsys, flags, message):
    from lorasft.cli import check_long_settings, parser

    args = parser().parse_args(["eval", "/some/run", "--long", *flags])
    with pytest.raises(Exception, match=message) as err:
        check_long_settings(args)
    assert type(err.value).__name__ == "ConfigError"


def test_tokenizer_without_eos_is_a_clear_error(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from lorasft.model.load import ModelError, load_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.eos_token = None
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="has no eos_token"):
        load_tokenizer(tmp_path)


def test_data_check_counts_the_system_prompt(capsys, tmp_path, tiny_llama_dir):
    good = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "hi", "output": "there"}])
    main(["data", "check", str(good), f"model.path={tiny_llama_dir}", "--json"])
    plain = json.loads(capsys.readouterr().out)
    main(
        [
            "data",
            "check",
            str(good),
            f"model.path={tiny_llama_dir}",
            "data.system_prompt=Be brief.",
            "--json",
        ]
    )
    system = json.loads(capsys.readouterr().out)
    assert "Be brief." in system["example"] and system["tokens"] > plain["tokens"]


def test_every_record_bad_lists_the_records(capsys, tmp_path, tiny_llama_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a"}\n{broken\n{"instruction": 3, "output": "b"}\n')
    expected = [f"{data}:1: output: missing", f"{data}:2: <line>: malformed JSON",
                f"{data}:3: instruction: must be a string, got int"]  # fmt: skip
    for argv in (["data", "check", str(data), f"model.path={tiny_llama_dir}"],
                 ["train", f"model.path={tiny_llama_dir}", f"data.train_file={data}",
                  "data.on_bad_record=skip", f"output.run_dir={tmp_path / 'run'}"]):  # fmt: skip
        rc, err = run(capsys, *argv)
        assert rc == 2 and "no usable records" in err and "every record was bad" in err
        assert all(line in err for line in expected), err


def test_unknown_lora_target_is_an_error_line(capsys, tmp_path, tiny_llama_dir):
    rc, err = run(capsys, "train", f"model.path={tiny_llama_dir}", "lora.target_modules=[nope]",
                  f"output.run_dir={tmp_path / 'run'}")  # fmt: skip
    assert rc == 2 and "Traceback" not in err
    assert ("\n" + err).count("\nerror: lora.target_modules=['nope']:") == 1
    assert "q_proj" in err  # the module names this model has


def test_unknown_template_is_a_config_error(capsys):
    rc, err = run(capsys, "data", "check", "x.jsonl", "data.template=chatgpt")
    assert rc == 2 and "data.template='chatgpt'" in err and "'alpaca'" in err


def test_a_run_prints_no_library_notices_and_says_what_it_evaluates(tiny_llama_dir, tmp_path):
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning nobody
    running lorasft can act on): the command line keeps it off the user's console. The final
    evaluation says what it is doing, step by step (it was silent for most of a minute)."""
    args = ["train", f"model.path={tiny_llama_dir}", f"output.run_dir={tmp_path / 'run'}",
            "train.max_steps=1", "eval.num_samples=2", "eval.max_new_tokens=2",
            "eval.cache_base=false"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "lorasft", *args], capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Warning" not in out.stderr + out.stdout, out.stderr[-2000:]
    steps = [line for line in out.stderr.splitlines() if line.startswith("[lorasft] evaluation:")]
    assert steps == ["[lorasft] evaluation: perplexity of the tuned run on 32 records",
                     "[lorasft] evaluation: the base's perplexity on 32 records and 2 answers",
                     "[lorasft] evaluation: 2 answers of the tuned run (up to 2 tokens)"], steps  # fmt: skip
