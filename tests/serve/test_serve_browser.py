"""The dashboard in a real browser: Debian's chromium driven by Playwright (never downloaded).

``ORCH_WRITE_SCREENSHOT=1`` also writes the 100-shard screenshot to docs/web.png.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servetest import Served, poll_for

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, served: Served) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(served.url)  # ?token= once: the cookie does the rest
    try:
        yield pg
    finally:
        context.close()
    assert not errors, errors


def test_runs_list_links_to_a_run(page: Any, served: Served) -> None:
    run_id = served.start("quick")
    served.wait_state(run_id, "done")
    page.goto(served.base + "/")
    link = page.locator(f'a[href="/runs/{run_id}"]')
    link.wait_for()
    row = page.locator(f'tr[data-run="{run_id}"]')
    assert "done" in row.inner_text()
    link.click()
    page.wait_for_url(f"**/runs/{run_id}")
    page.locator("#run-id", has_text=run_id).wait_for()
    assert page.locator("#run-title").inner_text() == "quick"


def test_run_page_shows_every_shard_and_goes_done_without_reload(page: Any, served: Served) -> None:
    run_id = served.start("steady")
    page.goto(f"{served.base}/runs/{run_id}")
    page.locator("#shards-table tbody tr").nth(11).wait_for()
    assert page.locator("#run-state").inner_text() == "running"
    ids = page.locator("#shards-table tbody tr td:first-child").all_inner_texts()
    assert ids == [str(i) for i in range(12)]
    assert page.locator("#node-th").is_hidden()  # a local run: no Node column
    assert page.evaluate("R.cells.length") == 12
    page.evaluate("window.__marker = 1")  # gone if the page reloads
    page.locator("#run-state", has_text="done").wait_for(timeout=60_000)
    assert page.evaluate("window.__marker") == 1
    assert served.run(run_id)["state"] == "done"
    assert "12" in page.locator("#run-counts").inner_text()
    assert page.locator("#stop-run").is_hidden()


def test_stop_run_button_stops_a_live_run(page: Any, served: Served) -> None:
    run_id = served.start("slow")
    served.wait_running(run_id, 4)
    page.goto(f"{served.base}/runs/{run_id}")
    button = page.get_by_role("button", name="Stop run")
    button.wait_for()
    button.click()
    served.wait_state(run_id, "stopped")
    page.locator("#run-state", has_text="stopped").wait_for(timeout=30_000)
    resume = page.get_by_role("button", name="Resume run")
    assert resume.is_visible()


def test_restart_button_starts_a_new_attempt(page: Any, served: Served) -> None:
    run_id = served.start("slow")
    served.wait_running(run_id, 4)
    page.goto(f"{served.base}/runs/{run_id}")
    row = page.locator('#shards-table tbody tr[data-shard="0"]')
    row.wait_for()
    try:
        restart = row.get_by_role("button", name="Restart")
        poll_for(restart.is_enabled, timeout=30)
        restart.click()
        assert poll_for(
            lambda: served.get(f"/api/v1/runs/{run_id}/shards/0").json()["attempts"] == 2,
            timeout=40,
        )
        assert served.get(f"/api/v1/runs/{run_id}/shards/1").json()["attempts"] == 1
    finally:
        served.post(f"/api/v1/runs/{run_id}/stop")
        served.wait_state(run_id, "stopped")


def test_screenshot_of_a_100_shard_run(page: Any, served: Served, tmp_path: Path) -> None:
    run_id = served.start("hundred")
    try:
        served.wait_running(run_id, 60)
        page.goto(f"{served.base}/runs/{run_id}")
        page.locator("#shards-table tbody tr").nth(24).wait_for()
        assert page.evaluate("R.cells.length") == 100
        # live figures: a rate, a shard that failed in the attention panel
        page.locator("#run-rate", has_text="/s").wait_for(timeout=40_000)
        page.locator("#attention .att").first.wait_for(timeout=40_000)
        page.locator("#spark path.line").wait_for(timeout=40_000)
        shot = tmp_path / "web.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 30_000
        if os.environ.get("ORCH_WRITE_SCREENSHOT"):
            shutil.copy(shot, DOCS / "web.png")
    finally:
        served.post(f"/api/v1/runs/{run_id}/stop")
        served.wait_state(run_id, "stopped", "failed")
