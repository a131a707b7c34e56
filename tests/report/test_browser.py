"""The report and the dashboard in a real browser: headless Chromium from Debian's packages driven
by playwright's Python client (its own browser download is not used). Screenshots go to the
test's folder, and to $LORASFT_SCREENSHOTS when set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_args


def _chromium() -> str | None:
    for name in (os.environ.get("LORASFT_CHROMIUM"), "chromium", "chromium-browser"):
        found = name and (shutil.which(name) or (Path(name).is_file() and name))
        if found:
            return str(found)
    return None


CHROMIUM = _chromium()
try:
    import playwright.sync_api  # noqa: F401
except ImportError:
    CHROMIUM = None
if CHROMIUM is None:
    message = ("a browser is needed: Debian's chromium (apt-get install chromium) and playwright "
               "(pip install -e '.[test]'); `make test` installs both")  # fmt: skip
    if os.environ.get("LORASFT_REQUIRE_BROWSER"):  # set by `make test`: never skipped there
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("LORASFT_SCREENSHOTS"):
        out = Path(os.environ["LORASFT_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)
    assert path.stat().st_size > 10_000  # a page was drawn, not a blank
    return path


def test_the_report_renders_the_runs_numbers(browser, finished_run, tmp_path):
    res = json.loads((finished_run / "results.json").read_text())
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto((finished_run / "report.html").resolve().as_uri())
    assert page.title() == f"lorasft report: {finished_run.name}"
    points = page.locator("svg circle.pt")
    logged = [r for r in res["log_history"] if "loss" in r or "eval_loss" in r]
    assert points.count() == len(logged) > 0
    box = page.locator("svg").first.bounding_box()
    assert box["width"] > 500 and box["height"] > 200  # the chart has its size on screen
    ys = [float(points.nth(i).get_attribute("cy")) for i in range(points.count())]
    assert len(set(ys)) > 1  # drawn at the values, not on one line
    tuned = page.locator("#metrics tr", has_text="tuned").inner_text()
    assert f"{res['eval']['tuned']['perplexity']['loss']:.4g}" in tuned
    assert page.locator("#samples tr.sample").count() == len(res["eval"]["samples"])
    legend = page.locator(".legend span").first
    legend.click()  # a legend entry hides its line
    assert (
        page.locator("g[data-series]").first.evaluate("e => getComputedStyle(e).display") == "none"
    )
    shot(page, tmp_path, "report")


def test_compare_overlays_the_runs(browser, finished_run, second_run, tmp_path):
    from lorasft.report.html import write_compare

    out = write_compare([finished_run, second_run], tmp_path / "compare.html")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(out.resolve().as_uri())
    assert page.locator("g[data-series]").count() == 4  # train and eval of each run
    assert page.locator("#config-diff", has_text="train.learning_rate").count() == 1
    shot(page, tmp_path, "compare")


@pytest.fixture
def dashboard(runs_root, finished_run):
    from lorasft.serve.engine_choice import EngineOptions
    from lorasft.serve.ui import create_ui
    from tests.serve.conftest import LiveServer

    with LiveServer(create_ui(runs_root, EngineOptions(engine="transformers"))) as server:
        yield server


def test_the_dashboard_shows_a_run_training_live(
    browser, dashboard, runs_root, tiny_llama_dir, tmp_path
):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(dashboard.url)
    page.wait_for_selector("#runs tr[data-run='tiny-a'] td.status.finished")
    live = runs_root / "tiny-live"
    args = tiny_args(tiny_llama_dir, live, "train.max_steps=60", "train.eval_steps=20",
                     "train.logging_steps=2", "eval.num_samples=2", "eval.compare_base=false")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "lorasft", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        row = "#runs tr[data-run='tiny-live']"
        page.wait_for_selector(f"{row} td.status.training", timeout=120_000)
        page.click(f"{row} a.pick")
        first = page.locator(f"{row} td.step").inner_text()
        deadline = time.monotonic() + 60
        while page.locator(f"{row} td.step").inner_text() == first and time.monotonic() < deadline:
            time.sleep(0.2)
        second = page.locator(f"{row} td.step").inner_text()
        assert second != first, "the step did not move on the page while training"
        page.wait_for_selector("#curve svg circle.pt")  # the live loss curve
        shot(page, tmp_path, "dashboard-training")
        assert proc.wait(timeout=180) == 0, proc.stderr.read()[-2000:]
        page.wait_for_selector(f"{row} td.status.finished", timeout=10_000)
        assert page.locator(f"{row} a", has_text="report").count() == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    before, after = (
        int(s.split("/")[0]) if s.split("/")[0].isdigit() else -1 for s in (first, second)
    )
    assert 0 <= before < after <= 60 and before < 60  # seen mid-training, then further on


def test_the_dashboard_chats_with_a_finished_run(browser, dashboard, finished_run, tmp_path):
    from lorasft.serve.engine import Params, load_engine

    message = "Who lives in Paris?"
    engine = load_engine(None, [(finished_run.name, str(finished_run))])
    served = engine.served[finished_run.name]
    want = engine.submit(served, engine.encode_chat(served, [{"role": "user", "content": message}]),
                         Params(max_tokens=64, temperature=0.0)).text()  # fmt: skip
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(dashboard.url)
    page.wait_for_selector(f"#chat-run option:text('{finished_run.name}')", state="attached")
    page.select_option("#chat-run", finished_run.name)
    page.fill("#message", message)
    page.click("#send")
    page.wait_for_function("document.getElementById('chat-state').textContent.startsWith('answered')",
                           timeout=120_000)  # fmt: skip
    assert page.locator("#answer-tuned").text_content() == want  # the engine's greedy answer
    assert page.locator("#answer-base").text_content() != ""
    shot(page, tmp_path, "dashboard-chat")
