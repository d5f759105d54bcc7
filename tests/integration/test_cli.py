"""The command line against a real server: serve, token, job, file, session, fsck basics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.harness import ServerProcess


def filedock(*args, env=None, check=True):
    """Run ``python -m filedock ARGS``; returns the completed process."""
    proc = subprocess.run([sys.executable, "-m", "filedock", *args], capture_output=True, text=True,
                          timeout=60, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"filedock {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def test_serve_on_port_zero_prints_the_ports_it_got(tmp_path):
    """`filedock serve` with tcp:0 prints the API URL and data-port address it listens on."""
    proc = subprocess.Popen([sys.executable, "-m", "filedock", "serve", "--data-dir", str(tmp_path / "d"),
                             "--api-listen", "tcp:0:interface=127.0.0.1",
                             "--data-listen", "tcp:0:interface=127.0.0.1", "--issue-admin-token"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while not any("admin token" in line for line in lines) and time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
        text = "".join(lines)
        api = re.search(r"filedock API:\s+http://127\.0\.0\.1:(\d+)/", text)
        data = re.search(r"filedock data port: 127\.0\.0\.1:(\d+)", text)
        assert api and data and int(api[1]) > 0 and int(data[1]) > 0, text
        assert "admin token: fdk_" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode == 0


def test_job_file_session_commands(server):
    """job create/show, jobs, file add/show, session open/close print the JSON the issue names."""
    env = server.env()
    job = json.loads(filedock("job", "create", "takes", "--meta", "studio=B", env=env).stdout)
    assert job["name"] == "takes" and job["metadata"] == {"studio": "B"} and job["state"] == "open"
    added = json.loads(filedock("file", "add", "takes", "a.wav", "1K", env=env).stdout)
    assert added["size"] == 1024 and re.fullmatch(r"[0-9a-f-]{36}", added["key"])
    shown = json.loads(filedock("job", "show", job["id"], "--json", env=env).stdout)
    assert shown["id"] == job["id"] and shown["state"] == "open"
    (f,) = shown["files"]
    assert {k: f[k] for k in ("name", "key", "size", "received", "state", "crc32", "digest")} == \
        {"name": "a.wav", "key": added["key"], "size": 1024, "received": 0, "state": "pending",
         "crc32": None, "digest": None}
    listed = json.loads(filedock("jobs", "--json", env=env).stdout)["jobs"]
    assert [j["name"] for j in listed] == ["takes"]
    assert "takes" in filedock("jobs", env=env).stdout  # the human table
    session = json.loads(filedock("session", "open", "takes", "--ttl", "60", env=env).stdout)
    assert 59 <= session["expires"] - session["created"] <= 61
    closed = json.loads(filedock("session", "close", session["key"], env=env).stdout)
    assert closed["closed"] is not None
    assert json.loads(filedock("file", "show", added["key"], env=env).stdout)["state"] == "pending"


def test_flags_override_environment_and_errors_have_codes(server, tmp_path):
    """--server/--token win over the environment; failures exit 1 with `error: <code>: ...`."""
    env = {**os.environ, "FILEDOCK_URL": "http://127.0.0.1:9/", "FILEDOCK_TOKEN": "wrong"}
    ok = filedock("jobs", "--json", "--server", server.url, "--token", server.token, env=env)
    assert json.loads(ok.stdout) == {"jobs": []}
    bad = filedock("jobs", "--server", server.url, "--token", "fdk_nope", env=env, check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: unauthorized: ")
    missing = filedock("job", "show", "no-such-job", env=server.env(), check=False)
    assert missing.returncode == 1 and "error: not-found: " in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr


def test_config_file_supplies_url_and_token(server, tmp_path):
    """url and token from $XDG_CONFIG_HOME/filedock/config.json are used when no flag or variable is set."""
    conf = tmp_path / "conf" / "filedock"
    conf.mkdir(parents=True)
    (conf / "config.json").write_text(json.dumps({"url": server.url, "token": server.token}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDOCK_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "conf")
    created = json.loads(filedock("job", "create", "from-config", env=env).stdout)
    assert created["name"] == "from-config"


def test_token_create_gives_a_working_token(tmp_path):
    """`filedock token create --data-dir D` prints a token the API accepts; it is stored hashed."""
    data = tmp_path / "data"
    token = filedock("token", "create", "--data-dir", str(data)).stdout.strip()
    assert token.startswith("fdk_")
    with ServerProcess(data) as server:
        server.token = token
        assert server.api.get("/v1/jobs") == {"jobs": []}
    raw = b"".join(p.read_bytes() for p in data.glob("filedock.sqlite3*"))
    assert token.encode() not in raw


@pytest.mark.parametrize("argv", [["file", "add", "J", "N", "lots"], ["serve", "--limit", "nonsense=1"]])
def test_usage_errors_exit_2(argv, server):
    """Malformed arguments exit 2 with a message, no traceback."""
    proc = filedock(*argv, env=server.env(), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
