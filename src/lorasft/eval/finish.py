"""The evaluation that ends a run, and `lorasft eval` on a finished one: perplexity, generation
metrics, base vs tuned, the overfitting verdict, long context when the run extended it; written to
the run folder and printed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorasft.config import Config
from lorasft.eval.evaluate import evaluate
from lorasft.eval.overfit import split_logs, verdict
from lorasft.model.loss import LossSettings
from lorasft.report.console import print_summary
from lorasft.run_files import (
    EVAL_RESULTS,
    EVAL_SAMPLES,
    LOSS_CURVE,
    RESULTS,
    SAMPLES,
    read_json,
    write_json,
)


def finish_run(run_dir: Path, model, tok, cfg: Config, examples, encoded, log_history,
               info: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Evaluate, then write results.json, loss_curve.png and samples.md, and print the table."""
    from lorasft.report.plots import loss_curve
    from lorasft.report.records import versions, write_results, write_samples

    ev = evaluate(model, tok, examples, encoded, cfg.eval, LossSettings.from_train(cfg.train))
    v = verdict(log_history, cfg.eval.overfit_patience)
    loss_curve(*split_logs(log_history), v, run_dir / LOSS_CURVE, title=run_dir.name)
    write_samples(run_dir / SAMPLES, ev.get("samples", []))
    results = {"config": cfg.model_dump(mode="json"), "data": counts, "train": info,
               "log_history": log_history, "eval": ev, "overfitting": v, "versions": versions()}  # fmt: skip
    if cfg.context.target_length is not None and cfg.eval.long:
        from lorasft.eval.long import evaluate_long, long_settings

        results["long_context"] = evaluate_long(model, tok, cfg, long_settings(cfg.eval), run_dir)
    write_results(run_dir / RESULTS, results)
    print_summary(ev, v, str(run_dir))
    from lorasft.report.html import write_report

    print(f"report: {write_report(run_dir).resolve()}")
    return results


def evaluate_run(run_dir: str | Path, data_file: str | None = None, num_samples: int | None = None,
                 long: dict | None = None, dtype: str | None = None) -> Path:  # fmt: skip
    """`lorasft eval`: the run as it trained, on its eval split (or `data_file`); writes
    eval_results.json and eval_samples.md (the answers, as training's samples.md) and returns the
    first's path. `long`: evaluate by length too, with the run's
    eval.long_* settings and these overrides."""
    from lorasft.data.prepare import eval_set
    from lorasft.model.reopen import open_run
    from lorasft.report.records import write_samples

    run_dir = Path(run_dir)
    run = open_run(run_dir, dtype)
    cfg = run.cfg
    if num_samples is not None:
        cfg = cfg.model_copy(
            update={"eval": cfg.eval.model_copy(update={"num_samples": num_samples})}
        )
    examples, encoded = eval_set(cfg.data, run.tok, data_file)
    ev = evaluate(
        run.model, run.tok, examples, encoded, cfg.eval, LossSettings.from_train(cfg.train)
    )
    if long is not None:
        from lorasft.eval.long import evaluate_long, long_settings

        settings = long_settings(cfg.eval, **long)
        ev["long_context"] = evaluate_long(run.model, run.tok, cfg, settings, run_dir)
    out = write_json(run_dir / EVAL_RESULTS, ev)
    write_samples(run_dir / EVAL_SAMPLES, ev.get("samples", []))
    log = (read_json(run_dir / RESULTS) or {}).get("log_history", [])
    print_summary(ev, verdict(log, cfg.eval.overfit_patience), str(run_dir))
    return out
