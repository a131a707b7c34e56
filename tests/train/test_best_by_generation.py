"""The best checkpoint chosen by a generation metric: computed on the eval records at every
evaluation, logged, read by early stopping, recorded in results.json."""

from __future__ import annotations

import json

import pytest

from lorasft.cli import main
from lorasft.config import ConfigError, load_config
from lorasft.eval.metrics import aggregate, json_scores
from tests.conftest import tiny_args


def test_the_best_checkpoint_is_the_one_with_the_best_chrf(tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(tiny_llama_dir, run, "train.max_steps=6", "train.eval_steps=2",
                     "train.metric_for_best_model=chrf", "train.learning_rate=2e-2",
                     "eval.num_samples=3", "eval.compare_base=false")  # fmt: skip
    assert main(args) == 0
    res = json.loads((run / "results.json").read_text())
    evals = [r for r in res["log_history"] if "eval_loss" in r]
    assert len(evals) == 3 and all("eval_chrf" in r and "eval_exact_match" in r for r in evals)
    assert all("eval_json_valid" in r for r in evals)  # the demo references are JSON objects
    best = max(evals, key=lambda r: r["eval_chrf"])  # greater is better; the first on a tie
    assert res["train"]["best_metric_name"] == "eval_chrf"
    assert res["train"]["best_metric"] == pytest.approx(best["eval_chrf"])
    assert res["train"]["best_step"] == min(
        r["step"] for r in evals if r["eval_chrf"] == best["eval_chrf"]
    )


def test_metric_names_are_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  metric_for_best_model: exact_match\n")
    assert load_config(cfg).train.metric_for_best_model == "eval_exact_match"
    cfg.write_text("train:\n  metric_for_best_model: eval_bleu\n")
    with pytest.raises(
        ConfigError, match="unknown metric 'eval_bleu'; choose one of loss, exact_match"
    ):
        load_config(cfg)


def test_json_scores_count_valid_objects_and_equal_fields():
    ref = '{"name": "张伟", "city": "北京"}'
    assert json_scores('{"name": "张伟", "city": "上海"}', ref) == (1.0, 0.5)
    assert json_scores('```json\n{"name": "张伟"}\n```', ref) == (0.0, 0.0)
    agg = aggregate(['{"name": "张伟", "city": "北京"}', "not json"], [ref, ref])
    assert (agg["json_valid"], agg["json_fields"]) == (50.0, 50.0)
    assert "json_valid" not in aggregate(["a"], ["plain text"])
