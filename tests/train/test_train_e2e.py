"""`lorasft train`, `eval` and `generate` end to end on tiny Llama, GPT-2 and OPT models."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorasft.cli import main
from lorasft.config import load_config
from lorasft.data.prepare import demo_files
from lorasft.report.records import write_samples
from tests.conftest import PNG, PRECISIONS, QUICK, precision_of, tiny_args, write_jsonl


def test_train_writes_every_output(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_args(tiny_model_dir, run)) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml",
                 "results.json", "loss_curve.png", "samples.md"):  # fmt: skip
        assert (run / name).is_file(), name
    assert (run / "loss_curve.png").read_bytes()[:8] == PNG
    assert any(k.endswith("lora_A.weight") for k in load_file(run / "adapter_model.safetensors"))
    r = json.loads((run / "results.json").read_text())
    assert r["data"]["train"]["sequences"] == 240 and r["data"]["eval"]["sequences"] == 32
    assert r["train"]["global_step"] == 4
    assert [h["step"] for h in r["log_history"] if "eval_loss" in h] == [2, 4]
    evals = [(h["eval_loss"], h["step"]) for h in r["log_history"] if "eval_loss" in h]
    assert r["overfitting"]["best_step"] == min(evals)[1] == r["train"]["best_step"]
    ev = r["eval"]
    assert ev["tuned"]["perplexity"]["tokens"] == r["data"]["eval"]["supervised_tokens"]
    assert ev["tuned"]["perplexity"]["loss"] != ev["base"]["perplexity"]["loss"]
    assert len(ev["samples"]) == 3 and ev["tuned"]["generation"]["n"] == 3
    assert set(r["versions"]) >= {"torch", "transformers", "peft"}
    samples = (run / "samples.md").read_text()
    assert samples.count("- reference:") == 3 and "- base:" in samples
    # The template the run trained with is saved with its tokenizer.
    assert "<|im_start|>" in json.loads((run / "tokenizer_config.json").read_text()).get(
        "chat_template",
        (run / "chat_template.jinja").read_text() if (run / "chat_template.jinja").exists() else "",
    )


@pytest.mark.parametrize("precision", PRECISIONS)
def test_eval_and_generate_on_a_finished_run(precision, tiny_llama_dir, tmp_path, capsys):
    """The reloaded run is the model that trained, in either precision: the same loss (same
    weights, same dtype, same kernels: no tolerance beyond float noise) and the same answers."""
    run = tmp_path / "run"
    assert main(tiny_args(tiny_llama_dir, run, "eval.compare_base=false",
                          f"train.precision={precision}")) == 0  # fmt: skip
    assert precision_of(run) == precision
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--num-samples", "2"]) == 0
    ev = json.loads((run / "eval_results.json").read_text())
    # Same adapter, same eval split: the reloaded run reproduces the loss of the trained one.
    assert (
        abs(ev["tuned"]["perplexity"]["loss"] - results["eval"]["tuned"]["perplexity"]["loss"])
        < 1e-4
    )
    assert len(ev["samples"]) == 2
    trained = [s["tuned"] for s in results["eval"]["samples"][:2]]
    assert [s["tuned"] for s in ev["samples"]] == trained and any(trained)
    # --data evaluates on another file: here 3 records of the training file.
    subset = tmp_path / "subset.jsonl"
    lines = Path(demo_files()[0]).read_text(encoding="utf-8").splitlines(keepends=True)
    subset.write_text("".join(lines[:3]), encoding="utf-8")
    assert main(["eval", str(run), "--data", str(subset), "--num-samples", "1"]) == 0
    other = json.loads((run / "eval_results.json").read_text())
    assert len(other["samples"]) == 1 and other["samples"][0]["source"] == f"{subset}:1"
    # The answers are readable beside it, those of this evaluation (not training's samples.md).
    md = (run / "eval_samples.md").read_text(encoding="utf-8")
    assert f"## 1. {subset}:1" in md and "## 2." not in md
    assert md == write_samples(tmp_path / "expected.md", other["samples"]).read_text("utf-8")
    assert other["tuned"]["perplexity"]["loss"] != ev["tuned"]["perplexity"]["loss"]
    capsys.readouterr()
    prompt = results["eval"]["samples"][0]["prompt"]
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == results["eval"]["samples"][0]["tuned"]


def test_skipped_records_are_counted_in_results(tiny_llama_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    good = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(12)]
    lines = [json.dumps(r) for r in good] + ['{"instruction": "x"}', "{broken", json.dumps(good[0])]
    data.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    args = tiny_args(tiny_llama_dir, run, f"data.train_file={data}", "data.eval_file=null",
                     "data.on_bad_record=skip", "data.val_ratio=0.25", "eval.num_samples=1")  # fmt: skip
    assert main(args) == 0
    counts = json.loads((run / "results.json").read_text())["data"]
    assert counts["train_files"]["skipped_bad"] == 2
    assert counts["train_files"]["duplicates_dropped"] == 1
    assert counts["train_files"]["bad_records"] == [f"{data}:13: output: missing",
                                                    f"{data}:14: <line>: malformed JSON: Expecting property name enclosed in double quotes at column 2"]  # fmt: skip
    assert counts["split"]["eval_records"] == 3 and counts["train"]["sequences"] == 9


def test_chinese_answers_train_every_linear_layer_unless_set(tiny_llama_dir, tmp_path, capsys):
    """`lora.by_answer_language`: a training file whose answers are Chinese trains the recipe
    chosen for them (every linear layer, rank 16, NEFTune 5) where the user set none of it; what
    the run used is in config.yaml, results.json and the saved adapter; a setting given stays."""
    data = write_jsonl(tmp_path / "zh.jsonl", [
        {"instruction": "把这个国家的正式全称改写为简称", "input": f"第{i}共和国", "output": f"第{i}国"}
        for i in "一二三四五六七八"])  # fmt: skip
    unset = ("lora.target_modules=", "lora.r=", "lora.alpha=", "data.augment.neftune_noise_alpha=")
    args = [a for a in tiny_args(tiny_llama_dir, tmp_path / "run", f"data.train_file={data}",
                                 "data.eval_file=null", "train.max_steps=2", "eval.num_samples=0")
            if not a.startswith(unset)]  # fmt: skip
    assert main(args) == 0
    assert "100% of the training answers' characters are Chinese" in capsys.readouterr().err
    run = tmp_path / "run"
    saved = load_config(run / "config.yaml")
    assert (saved.lora.target_modules, saved.lora.r, saved.lora.alpha) == ("all-linear", 16, 32)
    assert saved.data.augment.neftune_noise_alpha == 5.0
    info = json.loads((run / "results.json").read_text())["train"]["by_answer_language"]
    assert info["han_share"] == 1.0 and info["applied"]["lora.r"] == 16
    adapter = json.loads((run / "adapter_config.json").read_text())
    trained = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert {"gate_proj", "up_proj", "down_proj", "q_proj"} <= trained
    assert adapter["r"] == 16
    assert main([*args, f"output.run_dir={tmp_path / 'set'}", "lora.r=4"]) == 0
    set_r = load_config(tmp_path / "set" / "config.yaml").lora
    assert (set_r.r, set_r.target_modules) == (4, "all-linear")


def test_chat_streams_and_keeps_history(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import io

    import lorasft.eval.generate as generate_module

    run = tmp_path / "run"
    assert main(tiny_args(tiny_llama_dir, run, "eval.num_samples=0", "eval.compare_base=false",
                          "data.system_prompt=Be brief.")) == 0  # fmt: skip
    capsys.readouterr()
    seen, real_stream = [], generate_module.stream

    def recording_stream(model, tok, messages, gen):
        seen.append([(m["role"], m["content"]) for m in messages])
        yield from real_stream(model, tok, messages, gen)

    monkeypatch.setattr(generate_module, "stream", recording_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("u1\nu2\n/reset\nu3\n\n"))
    assert main(["chat", str(run), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    answers = [
        line.split("model> ", 1)[1].strip() for line in out.splitlines() if "model> " in line
    ]
    assert len(answers) == 3 and all(answers)  # three questions; /reset and the empty line not
    system = ("system", "Be brief.")  # the run's system prompt on every turn
    assert seen == [[system, ("user", "u1")],
                    [system, ("user", "u1"), ("assistant", answers[0]), ("user", "u2")],
                    [system, ("user", "u3")]]  # fmt: skip


def test_the_training_files_are_read_once(tiny_llama_dir, tmp_path, monkeypatch):
    """The answer-language rule and the run itself read the same files: once, handed on."""
    from lorasft.data import formats

    reads, real = [], formats.load_file
    monkeypatch.setattr(formats, "load_file", lambda path, fmt="auto": reads.append(str(path))
                        or real(path, fmt))  # fmt: skip
    args = tiny_args(tiny_llama_dir, tmp_path / "run", *QUICK, "train.max_steps=1")
    assert main(args) == 0
    train_file, eval_file = demo_files()
    assert sorted(reads) == sorted([train_file, eval_file]), reads
