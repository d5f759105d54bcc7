"""tus-js-client 4 in Node against a real filedock server (issue 12): tus 1.0 and the IETF draft.

Each test spawns ``node tests/node/tus_upload.mjs`` (tus-js-client from the npm registry,
installed by ``make test`` with ``npm ci`` in tests/node) against ``/files/`` on a real server
process, with an upload token of one job, and downloads the result with ``filedock download``.
Without Node the tests skip and say how to install it; under CI (``CI`` set) they fail.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration.harness import ServerProcess

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
SCRIPT = NODE_DIR / "tus_upload.mjs"
MiB = 1024 * 1024
CHUNK = 8 * MiB


def node_or_skip() -> str:
    """The node binary, with tus-js-client installed beside the script; else skip (fail under CI)."""
    node = shutil.which("node")
    installed = (NODE_DIR / "node_modules" / "tus-js-client" / "package.json").exists()
    if node and installed:
        return node
    why = ("these tests need Node.js >= 18 with npm (Debian: apt-get install nodejs npm); "
           "then `make test` installs tus-js-client with `npm ci` in tests/node")
    if not node:
        why = "node is missing: " + why
    else:
        why = "tus-js-client is not installed in tests/node (run `make test`, or `npm ci` there): " + why
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture
def node() -> str:
    return node_or_skip()


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.write(os.urandom(size % MiB))
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def tus_upload(node: str, server: ServerProcess, token: str, path: Path, **options) -> list[dict]:
    """Run one tus-js-client upload; its events, in order (the last one says how it ended)."""
    args = {"endpoint": server.url.rstrip("/") + "/files/", "token": token, "path": str(path), **options}
    run = subprocess.run([node, str(SCRIPT), json.dumps(args)], capture_output=True, text=True, timeout=240,
                         cwd=NODE_DIR)
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert events, f"no output from node (exit {run.returncode}): {run.stderr[-2000:]}"
    return events


def tus_extensions(server: ServerProcess) -> list[str]:
    """What ``OPTIONS /files/`` lists in ``Tus-Extension``."""
    address = urlsplit(server.url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    conn.request("OPTIONS", "/files/")
    response = conn.getresponse()
    response.read()
    conn.close()
    return [e.strip() for e in (response.getheader("Tus-Extension") or "").split(",")]


def upload_token(server: ServerProcess, job: str) -> str:
    return server.api.post("/v1/tokens", {"scope": "upload", "job": job, "label": "tus-js-client"})["token"]


def download(server: ServerProcess, job: str, name: str, dest: Path) -> Path:
    run = subprocess.run([sys.executable, "-m", "filedock", "download", "--job", job, name, str(dest)],
                         env=server.env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return dest


@pytest.mark.parametrize("protocol", ["tus-v1", "ietf-draft-05"])
def test_upload_aborted_midway_resumes_from_its_stored_url(node, server, tmp_path, protocol):
    """tus-js-client uploads in 8 MiB requests and is aborted in the middle of the third; a second
    process finds the upload's URL in the URL store, asks the server where it stands (at least the two
    acknowledged requests, durable), sends the rest in one request, and the stored file is
    byte-identical, with the digest the server reported to the client."""
    size = 48 * MiB + 12345
    source = random_file(tmp_path / "scan.tif", size)
    server.api.create_job("scans")
    token = upload_token(server, "scans")
    store = tmp_path / "tus-urls.json"
    meta = {"job": "scans", "filename": "scan.tif"}

    first = tus_upload(node, server, token, source, protocol=protocol, metadata=meta, chunkSize=CHUNK,
                       urlStorage=str(store), stopAfter=2 * CHUNK + CHUNK // 2)
    assert first[-1]["event"] == "stopped", first
    assert [f["state"] for f in server.api.job("scans")["files"]] != ["complete"]

    second = tus_upload(node, server, token, source, protocol=protocol, metadata=meta, urlStorage=str(store))
    start, end = second[0], second[-1]
    assert end["event"] == "success", second
    assert start["previous"] == 1 and start["url"] == first[-1]["url"]  # found in the store, not created anew
    assert end["url"] == first[-1]["url"]
    assert 2 * CHUNK <= end["resumedFrom"] < size  # resumed, not restarted
    assert json.loads(store.read_text() or "{}") == {}  # a finished upload leaves the store

    (record,) = server.api.job("scans")["files"]
    assert (record["name"], record["state"], record["size"]) == ("scan.tif", "complete", size)
    assert end["digest"] == f"blake3-4m={record['digest']}"
    back = download(server, "scans", "scan.tif", tmp_path / "back.tif")
    assert sha256_of(back) == sha256_of(source)


def test_parallel_uploads_concatenate_into_one_file(node, server, tmp_path):
    """``parallelUploads: 4`` (tus-v1): four partial uploads at once, then a final one that
    concatenates them; the job holds one complete file, byte-identical, and no parts."""
    assert "concatenation" in tus_extensions(server)
    size = 40 * MiB + 7
    source = random_file(tmp_path / "take.wav", size)
    server.api.create_job("takes")
    token = upload_token(server, "takes")
    events = tus_upload(node, server, token, source, protocol="tus-v1", parallelUploads=4,
                        metadata={"job": "takes", "filename": "take.wav"})
    assert events[-1]["event"] == "success", events

    files = server.api.job("takes")["files"]
    assert [(f["name"], f["state"], f["size"]) for f in files] == [("take.wav", "complete", size)]
    back = download(server, "takes", "take.wav", tmp_path / "back.wav")
    assert sha256_of(back) == sha256_of(source)
