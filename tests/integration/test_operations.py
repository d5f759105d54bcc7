"""Operating a server: metrics, job-completion events (webhook and command), outcome logs."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import urllib.request

from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import digest_of, put, recv_line, wait_for


class _Hook(http.server.BaseHTTPRequestHandler):
    """Records POSTed bodies; fails the first ``fail_first`` requests with 503."""

    received: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        if cls.fail_first > 0:
            cls.fail_first -= 1
            self.send_response(503)
        else:
            cls.received.append((self.headers["X-Filedock-Event-Id"], json.loads(body)))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def upload(server, session, key, data):
    sock, line = put(server, session, key, len(data))
    assert line == b"OFFSET 0"
    sock.sendall(data + f"DONE {digest_of(data)}\r\n".encode())
    assert recv_line(sock).startswith(b"STORED")


def test_job_completion_event_delivered_once_with_retry(tmp_path):
    """A job whose files all complete yields one event, retried after a 503, also given to a command."""
    _Hook.received, _Hook.fail_first = [], 1
    hook = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    out = tmp_path / "events.jsonl"
    extra = ["--webhook", f"http://127.0.0.1:{hook.server_port}/hook",
             "--on-complete", f"cat >> {out}; echo >> {out}"]
    try:
        with ServerProcess(tmp_path / "data", extra=extra) as server:
            job, files, session = server.job_with_files("evented", {"a": 1000, "b": 2000})
            upload(server, session["key"], files["a"]["key"], os.urandom(1000))
            assert server.api.job(job["id"])["state"] == "open"
            upload(server, session["key"], files["b"]["key"], os.urandom(2000))
            wait_for(lambda: _Hook.received, timeout=20)
            event_id, payload = _Hook.received[0]
            assert payload["id"] == event_id and payload["type"] == "job.complete"
            assert payload["job"] == {"id": job["id"], "name": "evented"}
            assert sorted(f["name"] for f in payload["files"]) == ["a", "b"]
            lines = wait_for(lambda: out.exists() and out.read_text().splitlines())
            assert json.loads(lines[0])["id"] == event_id
            time.sleep(1)
        # the retry went to the webhook only: the command, which took it the first time, saw it once
        before = out.read_text().splitlines()
        assert [json.loads(line)["id"] for line in before] == [event_id]
        with ServerProcess(tmp_path / "data", extra=extra):  # a restart redelivers nothing
            time.sleep(3)
    finally:
        hook.shutdown()
    assert len(_Hook.received) == 1
    assert out.read_text().splitlines() == before


def test_metrics_count_uploads_and_failures(server):
    """GET /metrics (with a token) shows bytes, completions and failures by code."""
    job, files, session = server.job_with_files("m", {"a": 5000})
    upload(server, session["key"], files["a"]["key"], os.urandom(5000))
    sock, line = put(server, session["key"], files["a"]["key"], 5000)  # already complete
    assert line.startswith(b"ERR already-complete")
    req = urllib.request.Request(server.url + "metrics", headers={"Authorization": f"Bearer {server.token}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    assert "filedock_received_bytes_total 5000" in text
    assert "filedock_uploads_completed_total 1" in text
    assert 'filedock_durable_seconds_count 1' in text
    unauth = urllib.request.Request(server.url + "metrics")
    try:
        urllib.request.urlopen(unauth, timeout=10)
        raise AssertionError("metrics served without a token")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401


def test_outcome_logged_once_per_upload_without_full_keys(server):
    """One log line per upload outcome with name, size and rate; no key appears in full."""
    job, files, session = server.job_with_files("logged", {"take1.wav": 3000})
    key = files["take1.wav"]["key"]
    upload(server, session["key"], key, os.urandom(3000))
    log = wait_for(lambda: "upload complete" in server.log() and server.log())
    line = next(l for l in log.splitlines() if "upload complete" in l)
    assert "take1.wav" in line and "size=3000" in line and "MB/s" in line
    assert key not in log and session["key"] not in log and server.token not in log


def test_json_log_lines_carry_the_upload_outcome(tmp_path):
    """--log-format json: every line is a JSON object; the outcome event has job, name, size, rate, result."""
    with ServerProcess(tmp_path / "data", extra=["--log-format", "json"]) as server:
        job, files, session = server.job_with_files("json-logged", {"a.bin": 4000})
        upload(server, session["key"], files["a.bin"]["key"], os.urandom(4000))
        wait_for(lambda: "upload-outcome" in server.log())
        log_text = server.log()
    events = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    assert events, log_text
    (outcome,) = [e for e in events if e.get("event") == "upload-outcome"]
    assert outcome["result"] == "complete" and outcome["name"] == "a.bin" and outcome["size"] == 4000
    assert outcome["sent"] == 4000 and outcome["rate"] > 0 and outcome["job"] == job["id"][:8] + "…"
    assert files["a.bin"]["key"] not in log_text and session["key"] not in log_text
