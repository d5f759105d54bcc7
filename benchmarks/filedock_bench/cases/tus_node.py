"""Node peers in case 1 (issue 12): the official Node tus server, and tus-js-client against filedock.

(g) ``@tus/server`` with ``@tus/file-store`` (benchmarks/node, installed from the npm registry
with its lockfile by ``make bench``) receives the same ``curl -X PATCH -T FILE`` as (f) does:
filedock / @tus/server is reported per interleaved run. @tus/server never fsyncs, so its 204
comes when the bytes are in the page cache; (f)'s comes after fsync, rename and record.
(h) and (i): tus-js-client in Node uploading to filedock as one stream, and with
``parallelUploads: 4`` (four partial uploads, then a concatenation).
"""

from __future__ import annotations

import http.client
import json
import statistics
import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from filedock_bench.measure import Figure, Sample, Skip
from filedock_bench.processes import run_timed
from filedock_bench.workspace import delete_job, remove

NODE_DIR = Path(__file__).resolve().parents[2] / "node"
PARALLEL = 4


def node_or_skip(package: str) -> str:
    """The node binary, with ``package`` installed in benchmarks/node; else ``Skip`` saying how."""
    node = shutil.which("node")
    if node is None:
        raise Skip("node is not installed (Node.js >= 20.19 with npm: apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / package / "package.json").exists():
        raise Skip(f"{package} is not installed: `make bench` runs `npm ci` in benchmarks/node")
    return node


def curl_patch(location: str, source: Path, headers: dict[str, str]) -> list[str]:
    """``curl -X PATCH -T FILE``: the whole file as one tus PATCH, as (f) sends it."""
    cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH", location,
           "-H", "Tus-Resumable: 1.0.0", "-H", "Upload-Offset: 0",
           "-H", "Content-Type: application/offset+octet-stream", "-T", str(source)]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    return cmd


class NodeTusServer:
    """``node benchmarks/node/tus_server.mjs PORT DIR``: @tus/server on 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = directory.with_suffix(".log")

    def start(self) -> None:
        node = node_or_skip("@tus/server")
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([node, str(NODE_DIR / "tus_server.mjs"), "0", str(self.directory)],
                                         stdout=subprocess.PIPE, stderr=log, cwd=NODE_DIR, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"@tus/server did not start: {line!r} {self.log.read_text()[-500:]}")
        self.port = int(line.split()[1])

    def create(self, size: int) -> str:
        """A new upload of ``size`` bytes (tus creation, not timed): its URL."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/files", headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(size)})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status != 201:
            raise RuntimeError(f"@tus/server creation answered {resp.status}")
        location = resp.getheader("Location")
        return location if location.startswith("http") else f"http://127.0.0.1:{self.port}{location}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        remove(self.directory)


class NodeTusServerPatch:
    """(g) the same ``curl -X PATCH -T FILE`` as (f), to @tus/server with @tus/file-store, timed until
    its 204 (no fsync: the bytes may still be only in the page cache)."""

    def __init__(self, setup) -> None:
        self.setup = setup
        self.server = NodeTusServer(setup.work / "tus-node-files")
        self.figure = Figure("1g-tus-node", "@tus/server + @tus/file-store: the same curl PATCH (until the 204, "
                                            "never fsync'd)", nbytes=setup.size)

    def start(self) -> None:
        if shutil.which("curl") is None:
            raise Skip("curl is not installed (apt-get install curl)")
        self.server.start()

    def run_once(self, index: int) -> Sample:
        location = self.server.create(self.setup.size)
        done = run_timed(curl_patch(location, self.setup.source, {}))
        if done.returncode != 0 or done.stdout.strip() != "204":
            raise RuntimeError(f"curl PATCH: exit {done.returncode}, status {done.stdout!r}: {done.stderr[-300:]}")
        for path in self.server.directory.iterdir():
            remove(path)
        return Sample(done.seconds)

    def stop(self) -> None:
        self.server.stop()


class TusJsUpload:
    """(h) / (i) ``node benchmarks/node/tus_js_upload.mjs``: tus-js-client to filedock's ``/files/``, one
    stream or ``parallelUploads: 4``; timed by the script from ``start()`` to ``onSuccess`` (durable)."""

    def __init__(self, setup, parallel: int) -> None:
        self.setup = setup
        self.parallel = parallel
        key, what = ("1h-tus-js-1", "one stream") if parallel == 1 else \
            (f"1i-tus-js-{parallel}", f"parallelUploads: {parallel} (partial uploads + concatenation)")
        self.figure = Figure(key, f"tus-js-client (Node) to filedock, {what}", nbytes=setup.size)
        self.node = ""

    def start(self) -> None:
        self.node = node_or_skip("tus-js-client")
        if self.setup.server is None:
            raise Skip("no filedock server in this run")
        if self.parallel > 1 and "concatenation" not in tus_extensions(self.setup.server.url):
            raise Skip("the server does not offer the tus concatenation extension (OPTIONS Tus-Extension)")

    def run_once(self, index: int) -> Sample:
        server = self.setup.server
        job = server.api.create_job(f"bench-tusjs-{self.parallel}-{index}-{uuid.uuid4().hex[:8]}")
        endpoint = server.url.rstrip("/") + "/files/"
        done = run_timed([self.node, str(NODE_DIR / "tus_js_upload.mjs"), endpoint, server.token,
                          str(self.setup.source), str(self.parallel), job["id"]])
        if done.returncode != 0:
            raise RuntimeError(f"tus-js-client: exit {done.returncode}: {done.stderr[-400:]}")
        out = json.loads(done.stdout.strip().splitlines()[-1])
        seconds = out["seconds"]
        files = server.api.job(job["id"])["files"]
        if [(f["state"], f["size"]) for f in files] != [("complete", self.setup.size)]:
            raise RuntimeError(f"tus-js-client: the job holds {[(f['state'], f['size']) for f in files]}")
        delete_job(server, job["id"])
        return Sample(seconds, {"node_process_seconds": done.seconds, "transfer_seconds": out.get("transfer_seconds")})

    def stop(self) -> None:
        pass


def tus_extensions(url: str) -> list[str]:
    """What ``OPTIONS /files/`` on the filedock server at ``url`` lists in ``Tus-Extension``."""
    address = urlsplit(url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    conn.request("OPTIONS", "/files/")
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return [e.strip() for e in (resp.getheader("Tus-Extension") or "").split(",")]


def per_run_ratios(top: Figure, bottom: Figure) -> list[float]:
    """``top``'s rate over ``bottom``'s, run by run: run i of each was taken in the same round."""
    return [b / t for t, b in zip(top.seconds, bottom.seconds)]


def note_ratios(figures: list[Figure]) -> None:
    """Add filedock / @tus/server to (g), and parallel / one stream to (i), with the per-run spread."""
    by_key = {f.key: f for f in figures}
    pairs = ((by_key.get("1f-tus-curl"), by_key.get("1g-tus-node"), "filedock (1f) / @tus/server (1g)"),
             (by_key.get(f"1i-tus-js-{PARALLEL}"), by_key.get("1h-tus-js-1"), f"{PARALLEL} parallel / one stream"))
    for top, bottom, what in pairs:
        if not top or not bottom or not top.samples or not bottom.samples:
            continue
        ratios = sorted(per_run_ratios(top, bottom))
        overall = top.mbps / bottom.mbps
        # on the row of the peer being compared with: (g) for the server, (i) for the parallel client
        row = bottom if bottom.key == "1g-tus-node" else top
        row.notes.append(f"{what}: **{overall:.2f}x** (per run {ratios[0]:.2f}–{ratios[-1]:.2f}x)")
        if row is top and top.key.startswith("1i-"):
            # the streams' aggregate alone: every byte handed over, before the final upload's concatenation
            # (which copies the parts into one file and hashes it, the same work again on this one disk)
            ts = [s.extra.get("transfer_seconds") for s in top.samples]
            if all(ts):
                aggregate = statistics.median(ts)
                one = statistics.median(s.extra.get("transfer_seconds") or s.seconds for s in bottom.samples)
                row.notes.append(f"aggregate of the {PARALLEL} streams until every byte was sent (before the "
                                 f"concatenation): {top.nbytes / aggregate / 1e6:.0f} MB/s, **{one / aggregate:.2f}x** "
                                 f"one stream's")
