"""The report opens from disk in headless Chromium: every image loads and nothing is logged to the console."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner
from test_report import run_sweep

from sparse_frontier.cli.main import cli

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")]


def test_report_opens_in_chromium_with_every_image_and_no_console_error(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    results = run_sweep(tmp_path, "results", policies=("dense", "block_sparse", "quest"))
    page = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", str(results), "--out", str(page)])
    assert result.exit_code == 0, result.output

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(page.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
        log = driver.get_log("browser")
        title = driver.title
    finally:
        driver.quit()
    assert title == "sparse-frontier report"
    assert len(images) >= 6
    assert all(complete and width > 0 for _, complete, width in images), images
    assert [e for e in log if e["level"] in ("SEVERE", "WARNING")] == [], log
