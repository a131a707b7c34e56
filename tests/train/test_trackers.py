"""train.report_to: the run's loss and lorasft's final metrics in MLflow (read back with MLflow's
own client from its file store), TensorBoard beside it, and an uninstalled tracker refused."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lorasft.cli import main
from lorasft.config import ConfigError, load_config
from lorasft.train.trackers import final_metrics
from tests.conftest import QUICK, tiny_args


def test_a_run_logs_its_loss_and_final_metrics_to_mlflow_and_tensorboard(
    tiny_llama_dir, tmp_path, monkeypatch
):
    import mlflow

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the file store on request
    run = tmp_path / "run"
    args = tiny_args(tiny_llama_dir, run, *QUICK, "train.report_to=[tensorboard,mlflow]",
                     "output.name=trackme", "train.logging_steps=1", "eval.num_samples=2")  # fmt: skip
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    losses = [(h["step"], h["loss"]) for h in results["log_history"] if "loss" in h]
    assert len(losses) == 4

    client = mlflow.MlflowClient(f"file:{store}")
    exp = client.get_experiment_by_name("trackme")
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "loss")]
    assert [s for s, _ in sorted(history)] == [s for s, _ in losses]
    assert [v for _, v in sorted(history)] == pytest.approx([v for _, v in losses])
    want = final_metrics(results)
    assert want["final/tuned/perplexity"] == results["eval"]["tuned"]["perplexity"]["perplexity"]
    logged = found.data.metrics
    for key in ("final/tuned/perplexity", "final/tuned/exact_match",
                "final/tuned/rouge_l"):  # fmt: skip
        assert logged[key] == pytest.approx(want[key]), key
    assert found.data.params["learning_rate"] == "0.001"  # the Trainer's arguments, as logged
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_final_metrics_flatten_the_eval_and_the_long_card():
    results = {"eval": {"tuned": {"perplexity": {"loss": 0.5, "perplexity": 1.65, "tokens": 10},
                                  "generation": {"exact_match": 50.0, "n": 4}},
                        "base": {"perplexity": {"perplexity": 3.0}}},
               "long_context": {"card": {"control": {"ratio_short": 0.9, "ratio_long": 0.8,
                                                     "untrained": "base_scaled"},
                                         "passkey": {"met": True, "tuned": {"rate": 0.5}}}}}  # fmt: skip
    assert final_metrics(results) == {
        "final/tuned/loss": 0.5, "final/tuned/perplexity": 1.65, "final/tuned/tokens": 10.0,
        "final/tuned/exact_match": 50.0, "final/tuned/n": 4.0, "final/base/perplexity": 3.0,
        "final/long/control/ratio_short": 0.9, "final/long/control/ratio_long": 0.8,
        "final/long/passkey/tuned/rate": 0.5,
    }  # fmt: skip


def test_an_uninstalled_tracker_stops_training_naming_the_package(tiny_llama_dir, tmp_path, capsys):
    assert importlib.util.find_spec("swanlab") is None  # the premise: not installed here
    run = tmp_path / "run"
    args = tiny_args(tiny_llama_dir, run, *QUICK, "train.report_to=[tensorboard,swanlab]")
    assert main(args) == 2
    assert (
        "train.report_to: not installed: swanlab (pip install swanlab)" in capsys.readouterr().err
    )
    assert not (run / "adapter_model.safetensors").exists()
    # a finished run's config with such a tracker still loads (eval, merge, serve open it)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {report_to: [tensorboard, swanlab]}\n")
    assert load_config(cfg).train.report_to == ["tensorboard", "swanlab"]
    cfg.write_text("train: {report_to: [neptune]}\n")
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(cfg)


def test_a_staged_run_logs_every_stage_into_one_mlflow_run(tiny_llama_dir, tmp_path, monkeypatch):
    """Each stage's Trainer has its own arguments (output folder, steps): only the first stage's
    are logged as parameters, which MLflow would otherwise refuse to change."""
    import mlflow

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "run"
    cfg = tmp_path / "staged.yaml"
    cfg.write_text(
        "stages:\n  - {name: a, train: {max_steps: 2}}\n  - {name: b, train: {max_steps: 3}}\n"
    )
    args = tiny_args(tiny_llama_dir, run, *QUICK, "train.report_to=[mlflow]", "output.name=staged")
    assert main([args[0], str(cfg), *args[1:]]) == 0
    client = mlflow.MlflowClient(f"file:{store}")
    (found,) = client.search_runs([client.get_experiment_by_name("staged").experiment_id])
    assert found.info.status == "FINISHED"
    losses = client.get_metric_history(found.info.run_id, "loss")
    hist = json.loads((run / "results.json").read_text())["log_history"]
    want = [h["loss"] for h in hist if "loss" in h]  # each stage's logged losses, in order
    assert len({h["stage"] for h in hist if "loss" in h}) == 2
    assert [m.value for m in sorted(losses, key=lambda m: m.timestamp)] == pytest.approx(want)
    assert found.data.params["max_steps"] == "2"  # the first stage's arguments
    assert "final/tuned/perplexity" in found.data.metrics
