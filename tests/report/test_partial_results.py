"""A run whose results.json is not whole yet (a writer from before the atomic write, a copy in
progress) is shown as not finished by `lorasft runs` and `lorasft ui`, never a 500."""

from __future__ import annotations

import shutil

import httpx

from lorasft.report.runs import run_summary
from lorasft.run_files import CONFIG, RESULTS

AUTH = {"Authorization": "Bearer k"}


def test_a_half_written_results_file_is_not_finished(ui, runs_root, finished_run):
    run = runs_root / "half-written"
    run.mkdir()
    shutil.copy(finished_run / CONFIG, run / CONFIG)
    whole = (finished_run / RESULTS).read_text(encoding="utf-8")
    (run / RESULTS).write_text(whole[: len(whole) // 2], encoding="utf-8")
    try:
        assert run_summary(run)["status"] in ("starting", "stopped")
        rows = httpx.get(ui.url + "/api/runs", headers=AUTH).json()["runs"]
        assert {r["name"]: r["status"] for r in rows}["half-written"] != "finished"
        for path in ("/runs/half-written/report", "/api/runs/half-written/curve"):
            r = httpx.get(ui.url + path, headers=AUTH)
            assert r.status_code == 200, (path, r.text[:300])
        assert (
            "still training" in httpx.get(ui.url + "/runs/half-written/report", headers=AUTH).text
        )
        r = httpx.get(ui.url + "/compare?runs=tiny-a,half-written", headers=AUTH)
        assert r.status_code == 409 and "half-written" in r.text
    finally:
        shutil.rmtree(run)
