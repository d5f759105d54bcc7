"""The upload page (Uppy over tus, issue 12) in Debian's chromium, driven by Playwright.

A 200 MB file goes into a job through ``/upload`` with an upload token of that job only;
the page is reloaded midway, the same file is added again, and the upload resumes from
the server's durable offset and finishes byte for byte. Uploads are slowed by Chromium's
own network throttling (DevTools), so "midway" does not depend on the machine's speed.
A second test picks a whole folder, pauses every upload and resumes them.
``FILEDOCK_UPLOAD_SCREENSHOT=docs/upload-page.png make e2e`` refreshes the README's picture.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_dashboard import browser  # noqa: F401  (the fixture)
from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import wait_for

pytestmark = pytest.mark.e2e

SIZE = 200 * 1000 * 1000
THROTTLE = 20 * 1000 * 1000  # bytes per second the browser may send: 10 s for the whole file


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
        f.write(os.urandom(size % (1 << 20)))
    return path


def upload_token(server: ServerProcess, job: str) -> str:
    return server.api.post("/v1/tokens", {"scope": "upload", "job": job, "label": "browser"})["token"]


def throttle(page, rate: int):
    """Limit what the page sends to ``rate`` bytes a second (Chromium's DevTools throttling)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": rate})
    return cdp


def sent(page) -> int:
    return page.evaluate("() => (window.filedockUppy?.getFiles()[0]?.progress.bytesUploaded) || 0")


def record_states(page) -> None:
    """Keep every state a file row of the page shows, however briefly (the finishing state included)."""
    page.evaluate("""() => {
        window.seenStates = new Set();
        new MutationObserver(() => document.querySelectorAll('tr.upload-file').forEach(
            (row) => window.seenStates.add(row.dataset.state))).observe(document.body, {subtree: true, childList: true});
    }""")


def test_upload_page_reload_midway_resumes_and_finishes_byte_identical(tmp_path, browser):  # noqa: F811
    """200 MB through the page with a job's upload token; a reload at about a third; the same file added
    again resumes from the server's offset (not from zero), shows 'finishing', then 'stored' with the
    server's digest; the stored file downloads byte for byte; the page loads nothing from elsewhere."""
    source = random_file(tmp_path / "film.mov", SIZE)
    with ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1G"]) as server:
        job = server.api.create_job("films")
        token = upload_token(server, "films")
        context = browser.new_context(viewport={"width": 1200, "height": 1000})
        requests: list[str] = []
        context.on("request", lambda r: requests.append(r.url))
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        page.goto(f"{server.url}upload#token={token}&job=films")
        page.wait_for_selector("#uppy .uppy-Dashboard")
        assert "token=" not in page.url  # the fragment leaves the address bar at once
        throttle(page, THROTTLE)
        page.set_input_files("#uppy input[type=file]:not([webkitdirectory])", str(source))
        page.click(".uppy-StatusBar-actionBtn--upload")
        wait_for(lambda: sent(page) > SIZE // 3, timeout=60)
        before_reload = sent(page)
        assert before_reload < SIZE

        page.reload()
        # the token and job survive a reload in this tab; the unfinished upload is listed with the
        # bytes the server holds
        page.wait_for_selector("#uppy .uppy-Dashboard")
        row = page.wait_for_selector("tr.unfinished:has-text('film.mov')")
        wait_for(lambda: "MB" in row.query_selector("td:nth-child(2)").inner_text(), timeout=15)
        throttle(page, THROTTLE)
        record_states(page)
        page.set_input_files("#uppy input[type=file]:not([webkitdirectory])", str(source))
        page.click(".uppy-StatusBar-actionBtn--upload")
        wait_for(lambda: sent(page) > SIZE * 2 // 3, timeout=60)
        if os.environ.get("FILEDOCK_UPLOAD_SCREENSHOT"):  # the README's picture: a resumed upload under way
            page.screenshot(path=os.environ["FILEDOCK_UPLOAD_SCREENSHOT"], full_page=True)
        page.wait_for_selector("tr.upload-file[data-state=stored]", timeout=120_000)
        seen = set(page.evaluate("() => [...window.seenStates]"))
        assert "finishing" in seen, seen  # not stuck at 100% with no word (uppy#4743)

        resumed_at = page.evaluate("() => window.filedockResumedAt()")
        # the server kept what arrived before the reload (at least a third), and the page took up from there
        assert len(resumed_at) == 1 and SIZE // 3 <= resumed_at[0] < SIZE, (resumed_at, before_reload)
        assert page.query_selector("tr.unfinished") is None  # done: no longer listed

        files = server.api.job("films")["files"]
        assert [(f["name"], f["state"], f["size"]) for f in files] == [("film.mov", "complete", SIZE)]
        shown = page.inner_text("tr.upload-file td.digest")
        assert shown == files[0]["digest"]

        back = tmp_path / "back.mov"
        run = subprocess.run([sys.executable, "-m", "filedock", "download", "--job", job["id"], "film.mov", str(back)],
                             env=server.env(), capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert sha256_of(back) == sha256_of(source)

        outside = [u for u in requests if not u.startswith(server.url) and not u.startswith(("blob:", "data:"))]
        assert outside == []
        assert not [m for m in console if "Content Security Policy" in m]  # the page works under its policy
        context.close()


def test_upload_page_takes_a_folder_pauses_and_resumes(tmp_path, browser):  # noqa: F811
    """Signing in with a bad token or another job's name is refused with a word; then a folder picked
    whole: each file is named by its path under the folder; pausing every upload
    stops the bytes (the server's count stands still), resuming finishes them all, byte for byte."""
    folder = tmp_path / "session-42"
    sizes = {"take1.wav": 24_000_000, "notes/readme.txt": 1_000, "notes/deep/take2.wav": 30_000_000}
    for name, size in sizes.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        random_file(folder / name, size)
    with ServerProcess(tmp_path / "data") as server:
        job = server.api.create_job("sessions")
        server.api.create_job("other")
        token = upload_token(server, "sessions")
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(f"{server.url}upload")
        page.fill("#token", "fdk_not-a-token")
        page.fill("#job", "sessions")
        page.click("#signin-form button[type=submit]")
        page.wait_for_selector("#signin-error:has-text('not valid')")
        page.fill("#token", token)
        page.fill("#job", "other")  # exists, but the token is of another job
        page.click("#signin-form button[type=submit]")
        page.wait_for_selector("#signin-error:has-text('may not upload to it')")
        page.fill("#job", "sessions")
        page.click("#signin-form button[type=submit]")
        page.wait_for_selector("#uppy .uppy-Dashboard")
        throttle(page, 10 * 1000 * 1000)
        page.set_input_files("#uppy input[type=file][webkitdirectory]", str(folder))
        page.wait_for_selector("tr.upload-file >> nth=2")
        names = sorted(page.eval_on_selector_all("tr.upload-file", "rows => rows.map(r => r.dataset.name)"))
        assert names == sorted(f"session-42/{n}" for n in sizes)
        page.click(".uppy-StatusBar-actionBtn--upload")

        def received() -> int:
            return sum(f["received"] for f in server.api.job("sessions")["files"])
        total = sum(sizes.values())
        wait_for(lambda: total // 5 < page.evaluate(
            "() => window.filedockUppy.getFiles().reduce((n, f) => n + (f.progress.bytesUploaded || 0), 0)"), timeout=60)
        page.click("button[title='Pause']")  # the status bar's "pause all"
        wait_for(lambda: page.query_selector_all("tr.upload-file[data-state=paused]"), timeout=10)
        time.sleep(1.5)  # what was in flight lands and is checkpointed
        held = received()
        time.sleep(2)
        assert 0 < received() == held < total  # paused: what arrived is kept, nothing more arrives

        page.click("button[title='Resume']")
        wait_for(lambda: len(page.query_selector_all("tr.upload-file[data-state=stored]")) == 3, timeout=120)
        files = {f["name"]: f for f in server.api.job("sessions")["files"]}
        assert {n: (f["state"], f["size"]) for n, f in files.items()} == \
            {f"session-42/{n}": ("complete", s) for n, s in sizes.items()}
        for name in sizes:
            back = tmp_path / "back" / name
            back.parent.mkdir(parents=True, exist_ok=True)
            run = subprocess.run([sys.executable, "-m", "filedock", "download", "--job", job["id"],
                                  f"session-42/{name}", str(back)],
                                 env=server.env(), capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr
            assert sha256_of(back) == sha256_of(folder / name)
