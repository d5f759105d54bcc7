"""The web dashboard in a real headless browser (Debian's chromium, driven by Playwright).

Runs with ``make e2e`` (CI runs it too): it needs /usr/bin/chromium, which `.ci/run`
installs from Debian's packages.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import digest_of, put, recv_line, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.e2e


ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    """Debian's chromium under Playwright (make e2e installs playwright; .ci/run installs chromium)."""
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), "make e2e needs Debian's chromium: apt-get install chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_dashboard_shows_jobs_files_and_live_progress(tmp_path, browser):
    """Sign in with a token, see a job's files with digests, and an upload's progress change live."""
    data = os.urandom(3 * 1024 * 1024)
    with ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=256K"]) as server:
        job, files, session = server.job_with_files("dashboard-job", {"done.bin": len(data), "live.bin": len(data)})
        sock, _ = put(server, session["key"], files["done.bin"]["key"], len(data))
        sock.sendall(data + f"DONE {digest_of(data)}\r\n".encode())
        assert recv_line(sock).startswith(b"STORED")

        page = browser.new_page()
        page.goto(server.url)
        page.fill("#token", "not-a-token")
        page.click("button[type=submit]")
        page.wait_for_selector("#login-error:has-text('not valid')")

        page.fill("#token", server.token)
        page.click("button[type=submit]")
        page.wait_for_selector("tr.job:has-text('dashboard-job')")
        page.click("tr.job:has-text('dashboard-job')")
        row = page.wait_for_selector("tr.file:has-text('done.bin')")
        assert "complete" in row.inner_text() and digest_of(data) in row.inner_text()
        assert "pending" in page.inner_text("tr.file:has-text('live.bin')")

        # a slow upload in progress: the page shows it and its progress moves without a reload
        sock, _ = put(server, session["key"], files["live.bin"]["key"], len(data))
        stop = threading.Event()

        def trickle():
            for i in range(0, len(data), 128 * 1024):
                if stop.is_set():
                    return
                sock.sendall(data[i:i + 128 * 1024])
                time.sleep(0.15)
        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        page.wait_for_selector("tr.upload:has-text('live.bin')", timeout=15000)
        first = page.eval_on_selector("tr.upload progress", "p => p.value")
        wait_for(lambda: page.eval_on_selector("tr.upload progress", "p => p.value") > first, timeout=15)
        page.screenshot(path=str(tmp_path / "dashboard.png"))
        if os.environ.get("FILEDOCK_SCREENSHOT"):
            page.screenshot(path=os.environ["FILEDOCK_SCREENSHOT"])
        stop.set()
        sender.join()
        sock.close()
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
