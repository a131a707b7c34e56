"""report.html, compare.html, `lorasft runs` and the dashboard's guards (no browser needed)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from lorasft.cli import main
from lorasft.report.html import marked_diff, units


def test_every_finished_run_has_a_report_with_its_numbers(finished_run):
    page = (finished_run / "report.html").read_text(encoding="utf-8")
    res = json.loads((finished_run / "results.json").read_text())
    assert "http://" not in page and "https://" not in page  # self-contained: opens offline
    points = re.findall(r'<circle class="pt"[^>]*data-x="(\d+)" data-y="([^"]+)"', page)
    logged = [(r["step"], r["loss"]) for r in res["log_history"] if "loss" in r]
    logged += [(r["step"], r["eval_loss"]) for r in res["log_history"] if "eval_loss" in r]
    assert [(int(x), round(float(y), 4)) for x, y in points] == [
        (s, round(v, 4)) for s, v in logged
    ]
    tuned = res["eval"]["tuned"]["perplexity"]["loss"]
    assert f"{tuned:.4g}" in page and "Base vs tuned" in page
    assert page.count("<tr class=sample>") == len(res["eval"]["samples"]) == 4
    assert "train.max_steps" in page and "class=changed" in page  # non-defaults highlighted


def test_report_rewrites_for_an_old_run_and_compares_several(
    finished_run, second_run, tmp_path, capsys
):
    (finished_run / "report.html").unlink()
    assert main(["report", str(finished_run)]) == 0
    assert (finished_run / "report.html").is_file()
    out = tmp_path / "compare.html"
    assert main(["report", str(finished_run), str(second_run), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert "tiny-a" in page and "tiny-b" in page
    diff = page[page.index("id=config-diff") :]
    assert "train.learning_rate" in diff and "train.eval_steps" in diff and "model.path" not in diff
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_runs_table_names_status_and_what_differs(finished_run, second_run, runs_root, capsys):
    (runs_root / "broken").mkdir(exist_ok=True)
    (runs_root / "broken" / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    (runs_root / "broken" / "progress.json").write_text(json.dumps(
        {"status": "training", "pid": 999999999, "step": 3, "max_steps": 6, "log": []}))  # fmt: skip
    assert main(["runs", str(runs_root)]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["tiny-a"][1] == "finished" and lines["tiny-a"][2] == "6/6"
    assert lines["broken"][1] == "stopped"  # its process is gone without results.json
    header = main(["runs", str(runs_root)]) == 0 and capsys.readouterr().out.splitlines()[0]
    assert "train.learning_rate" in header


def test_differences_are_marked_per_word_and_per_cjk_character():
    assert units("北京 is big") == ["北", "京", " ", "is", " ", "big"]
    marked = marked_diff("张伟住在北京", "张伟住在上海")
    assert marked == "张伟住在<del>北京</del><ins>上海</ins>"
    assert marked_diff("the cat sat", "the dog sat") == "the <del>cat</del><ins>dog</ins> sat"


@pytest.mark.parametrize("path", ["/runs/..%2F..%2Fetc/report", "/runs/%2E%2E/report",
                                  "/runs/../../etc/passwd", "/api/runs/..%2Fx/curve",
                                  "/compare?runs=tiny-a,..%2F..%2Fetc", "/runs/nope/report"])  # fmt: skip
def test_the_dashboard_serves_nothing_outside_the_runs_folder(ui, path):
    r = httpx.get(ui.url + path, headers={"Authorization": "Bearer k"})
    assert r.status_code in (400, 404) and "root:" not in r.text


def test_the_dashboard_needs_its_key(ui):
    assert httpx.get(ui.url + "/api/runs").status_code == 401
    assert (
        httpx.get(ui.url + "/api/runs", headers={"Authorization": "Bearer no"}).status_code == 401
    )
    with httpx.Client(base_url=ui.url) as c:
        assert c.get("/?key=k").status_code == 200  # sets a cookie the page's requests carry
        assert "tiny-a" in [r["name"] for r in c.get("/api/runs").json()["runs"]]


def test_long_context_results_show_as_a_table_with_the_plots_inside(tmp_path):
    from lorasft.report.html import run_report

    (tmp_path / "passkey.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    long = {"method": "yarn", "factor": 2.0, "original_window": 8192, "target_length": 16384,
            "lengths": [8192, 16384], "plots": ["passkey.png", "missing.png"],
            "perplexity": {"base": {"8192": {"perplexity": 11.55}, "16384": {"perplexity": 1538.2}},
                           "tuned": {"8192": {"perplexity": 11.02}, "16384": {"perplexity": 11.08}}}}  # fmt: skip
    page = run_report({"long_context": long}, "x", tmp_path)
    table = page[page.index("<table id=long>") :]
    assert "1538" in table and "11.08" in table and table.index("base") < table.index("tuned")
    assert page.count("data:image/png;base64,") == 1  # the plot that exists, inside the page


def test_chat_with_a_run_still_training_is_refused(ui, runs_root, finished_run):
    half = runs_root / "half-done"
    half.mkdir(exist_ok=True)
    (half / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    r = httpx.post(ui.url + "/api/chat", json={"run": "half-done", "message": "hi"},
                   headers={"Authorization": "Bearer k"})  # fmt: skip
    assert r.status_code == 409 and "has not finished" in r.json()["detail"]
