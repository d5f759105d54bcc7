"""HTTP uploads (issue 12): one large upload as one tus PATCH from curl, and the server's memory during it.

Case 1 runs ``TusCurlPatch`` beside the raw limit (b) (variant ``tus-curl``); case 2
adds ``tus_rss`` (the server's RSS growth during one tus PATCH of ``--rss-size``).
"""

from __future__ import annotations

import base64
import http.client
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from filedock_bench.measure import Figure, Sample, Skip
from filedock_bench.memory import RssSampler, status_kib
from filedock_bench.processes import run_timed
from filedock_bench.workspace import ServerProcess, delete_job


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def create_upload(server: ServerProcess, job: str, name: str, size: int) -> str:
    """A job and a tus upload of ``size`` bytes in it (tus creation): the upload's URL."""
    server.api.create_job(job)
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/files/", headers={
        "Authorization": f"Bearer {server.token}", "Tus-Resumable": "1.0.0", "Upload-Length": str(size),
        "Upload-Metadata": f"job {_b64(job)},filename {_b64(name)}"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    if resp.status != 201:
        raise RuntimeError(f"tus creation answered {resp.status}")
    return resp.getheader("Location")


def curl_patch(server: ServerProcess, location: str, source: Path) -> list[str]:
    """``curl -X PATCH -T FILE``: the whole file as one tus PATCH."""
    return ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH", location,
            "-H", f"Authorization: Bearer {server.token}", "-H", "Tus-Resumable: 1.0.0",
            "-H", "Upload-Offset: 0", "-H", "Content-Type: application/offset+octet-stream", "-T", str(source)]


class TusCurlPatch:
    """(f) ``curl -X PATCH -T FILE`` to ``/files/<key>`` (tus 1.0), timed until the 204: the file is then
    fsync'd, renamed into place and recorded."""

    def __init__(self, setup) -> None:
        self.setup = setup
        self.figure = Figure("1f-tus-curl", "tus: one PATCH from curl -T (until the 204, durable)",
                             nbytes=setup.size)

    def start(self) -> None:
        if shutil.which("curl") is None:
            raise Skip("curl is not installed (apt-get install curl)")

    def run_once(self, index: int) -> Sample:
        server = self.setup.server
        job = f"bench-tus-{index}-{uuid.uuid4().hex[:8]}"
        location = create_upload(server, job, "source.bin", self.setup.size)
        done = run_timed(curl_patch(server, location, self.setup.source))
        if done.returncode != 0 or done.stdout.strip() != "204":
            raise RuntimeError(f"curl PATCH: exit {done.returncode}, status {done.stdout!r}: {done.stderr[-300:]}")
        delete_job(server, job)
        return Sample(done.seconds)

    def stop(self) -> None:
        pass


def tus_rss(server: ServerProcess, source: Path) -> Figure:
    """The server's peak RSS growth during one tus PATCH of ``source`` (from curl) over its RSS just before."""
    size = source.stat().st_size
    job = f"bench-tus-rss-{uuid.uuid4().hex[:8]}"
    pid = server.proc.pid
    location = create_upload(server, job, source.name, size)
    time.sleep(0.5)
    idle = status_kib(pid)["VmRSS"]
    with RssSampler() as sampler:
        sampler.add(pid)
        done = run_timed(curl_patch(server, location, source))
    if done.returncode != 0 or done.stdout.strip() != "204":
        raise RuntimeError(f"curl PATCH: exit {done.returncode}, status {done.stdout!r}")
    peak = sampler.max_rss.get(pid, 0)
    figure = Figure("2-server-tus", f"server peak RSS growth during one {size >> 20} MiB tus PATCH (curl -T)",
                    nbytes=size, samples=[Sample(done.seconds)])
    figure.value, figure.value_unit = (peak - idle) / 1024, "MiB"
    figure.notes.append(f"idle {idle / 1024:.1f} MiB, largest sampled VmRSS {peak / 1024:.1f} MiB, "
                        f"{sampler.samples} samples (VmHWM is not used: an earlier upload set it)")
    delete_job(server, job)
    return figure
