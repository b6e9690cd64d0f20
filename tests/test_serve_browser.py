"""The browser page of ``atssdet serve``, driven in headless Chromium (Debian's package) by Playwright.

Starts the real server (``python -m atssdet serve --port 0``) in a subprocess, uploads an image,
waits for the boxes, moves the score slider with the mouse, checks the drawn-box count against the
JSON, downloads the JSON and saves a screenshot (``$ATSSDET_SCREENSHOT_DIR`` or pytest's tmp dir).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from tests.conftest import R18, REPO_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi) is not installed")
playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="playwright (dev extra) is not installed; run `make setup`"
)
if not os.path.exists(CHROMIUM):
    pytest.skip(
        "chromium is not installed (`make setup` installs Debian's package when apt-get is available)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def server_url(r18_checkpoint: Path) -> Iterator[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atssdet",
            "serve",
            "--model",
            R18,
            "--weights",
            str(r18_checkpoint),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--set",
            "test_image_short_size=320",
            "--set",
            "test_image_max_size=512",
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    seen: list[str] = []
    url = None
    try:
        while url is None:
            try:
                line = lines.get(timeout=180)
            except queue.Empty:
                break
            seen.append(line)
            match = re.search(r"listening on (http://\S+/)", line)
            if match:
                url = match.group(1)
        assert url, "server did not start:\n" + "".join(seen)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_page_uploads_draws_filters_and_downloads(server_url, reference_dir, tmp_path):
    shots = Path(os.environ.get("ATSSDET_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 900}, accept_downloads=True)
            detect_posts: list[str] = []
            page.on("request", lambda r: detect_posts.append(r.url) if r.url.endswith("/v1/detect") else None)
            page.goto(server_url)
            page.wait_for_function("document.getElementById('model').textContent.includes('atss_res18')")
            page.set_input_files("#file", str(reference_dir / "cat.jpg"))
            page.wait_for_function("window.atssdet.result !== null && !window.atssdet.busy", timeout=120_000)
            result = page.evaluate("window.atssdet.result")
            assert page.locator("#status").get_attribute("class") != "error", page.inner_text("#status")
            assert result["image"] == {"width": 459, "height": 612}

            def drawn() -> int:
                return int(page.locator("#canvas").get_attribute("data-drawn-boxes") or -1)

            def threshold() -> float:
                return float(page.locator("#threshold").input_value())

            t0, before = threshold(), drawn()
            assert t0 == pytest.approx(0.3)  # the model's test_vis_threshold
            assert before == sum(s >= t0 for s in result["scores"]) > 0
            page.screenshot(path=str(shots / "serve_page_before.png"), full_page=True)

            # Drag the slider thumb to about 0.45 with the mouse.
            box = page.locator("#threshold").bounding_box()
            assert box is not None
            lo, hi = 0.05, 1.0
            page.mouse.click(box["x"] + box["width"] * (0.3 - lo) / (hi - lo), box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(
                box["x"] + box["width"] * (0.45 - lo) / (hi - lo), box["y"] + box["height"] / 2, steps=5
            )
            page.mouse.up()
            t1, after = threshold(), drawn()
            assert 0.35 < t1 < 0.55, t1
            assert after == sum(s >= t1 for s in result["scores"])
            assert 0 < after < before
            assert page.inner_text("#threshold-value") == f"{t1:.2f}"
            assert f"{after} of {len(result['scores'])} detections shown" in page.inner_text("#count")
            assert len(detect_posts) == 1  # filtering happened in the page, no new request
            page.screenshot(path=str(shots / "serve_page.png"), full_page=True)

            with page.expect_download() as download:
                page.click("#download")
            assert download.value.suggested_filename == "cat.detections.json"
            saved = tmp_path / "download.json"
            download.value.save_as(saved)
            assert json.loads(saved.read_text()) == result
        finally:
            browser.close()
    shot = cv2.imread(str(shots / "serve_page.png"))
    assert shot is not None and shot.shape[0] >= 612 and shot.std() > 10
