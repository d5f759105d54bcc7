"""The dashboard as a first-time user meets it (issue 15, item 6), in Debian's chromium.

Active uploads name their job and show a rate and the time left; a throughput chart
is drawn by the page itself; sizes use the CLI's decimal units; a complete file
downloads from the job view through a signed link. ``FILEDOCK_SCREENSHOT=docs/dashboard.png
make e2e`` refreshes the README's screenshot.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.e2e.test_dashboard import browser  # noqa: F401  (the fixture)
from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import digest_of, put, recv_line, wait_for

pytestmark = pytest.mark.e2e


def test_dashboard_names_jobs_draws_throughput_and_downloads(tmp_path, browser):  # noqa: F811
    """Sign in; see the upload under its job's name with rate and time left, a throughput line,
    decimal units, and download a complete file from the job view byte for byte."""
    done = os.urandom(1_500_000)
    live = os.urandom(12_000_000)
    with ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=256K"]) as server:
        job, files, session = server.job_with_files("recordings", {"take1.wav": len(done), "take2.wav": len(live)})
        sock, _ = put(server, session["key"], files["take1.wav"]["key"], len(done))
        sock.sendall(done + f"DONE {digest_of(done)}\r\n".encode())
        assert recv_line(sock).startswith(b"STORED")
        sock.close()

        page = browser.new_page(viewport={"width": 1200, "height": 900}, accept_downloads=True)
        page.goto(server.url)
        assert "admin-token" in page.inner_text("#login")  # the page says where a token comes from
        page.fill("#token", server.token)
        page.click("button[type=submit]")
        page.wait_for_selector("tr.job:has-text('recordings')")

        sock, _ = put(server, session["key"], files["take2.wav"]["key"], len(live))
        stop = threading.Event()

        def trickle():
            for i in range(0, len(live) - 64 * 1024, 64 * 1024):
                if stop.is_set():
                    return
                sock.sendall(live[i:i + 64 * 1024])
                time.sleep(0.05)
        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            row = page.wait_for_selector("tr.upload:has-text('take2.wav')", timeout=15000)
            assert row.inner_text().split("\t")[0] == "recordings"  # the job's name, not an id prefix
            assert job["id"][:8] not in row.inner_text()
            wait_for(lambda: "/s" in page.inner_text("tr.upload") and ":" in page.inner_text("tr.upload td:nth-child(7)"),
                     timeout=15)
            assert " MB" in page.inner_text("tr.upload") or " kB" in page.inner_text("tr.upload")
            assert "MiB" not in page.inner_text("body") and "KiB" not in page.inner_text("body")
            # the chart: a line with points drawn from the server's byte counter, a rate above it
            wait_for(lambda: page.query_selector("#chart polyline") is not None
                     and len((page.get_attribute("#chart polyline", "points") or "").split()) > 2, timeout=15)
            wait_for(lambda: "/s" in page.inner_text("#rate-now"), timeout=15)

            page.click("tr.job:has-text('recordings')")
            page.wait_for_selector("tr.file:has-text('take1.wav') button.download")
            assert page.query_selector("tr.file:has-text('take2.wav') button.download") is None
            assert "1.5 MB" in page.inner_text("tr.file:has-text('take1.wav')")
            time.sleep(5)  # more throughput samples for the picture
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            if os.environ.get("FILEDOCK_SCREENSHOT"):
                page.screenshot(path=os.environ["FILEDOCK_SCREENSHOT"], full_page=True)
            with page.expect_download() as info:
                page.click("tr.file:has-text('take1.wav') button.download")
            download = info.value
            assert download.suggested_filename == "take1.wav"
            assert open(download.path(), "rb").read() == done
        finally:
            stop.set()
            sender.join()
            sock.close()
