"""Case 4: what resuming costs.

An upload is interrupted at 90% (PUT, 90% of the bytes, close; we wait until the
server records ``received`` = 90%), then finished on a new connection (PUT,
OFFSET, the last 10%, DONE, STORED): that second connection is timed. The yardstick
is a fresh upload of a file the size of that last 10%.
"""

from __future__ import annotations

import time
import uuid

from filedock_bench import plain_client
from filedock_bench.measure import Figure, Sample, human_size, run_interleaved, say
from filedock_bench.workspace import ServerProcess, Workspace, delete_job, filedock_server, random_file, wait_for


class Resume:
    """Interrupt at 90% (not timed), then time the finish."""

    def __init__(self, server: ServerProcess, source, size: int) -> None:
        self.server, self.source, self.size = server, source, size
        self.cut = size * 9 // 10
        self.figure = Figure("4-resume", "resume at 90%: finish the last 10%", nbytes=size - self.cut)

    def start(self) -> None:
        pass

    def run_once(self, index: int) -> Sample:
        server = self.server
        job, files, session = server.job_with_files(f"bench-resume-{uuid.uuid4().hex[:8]}", {"f": self.size})
        key = files["f"]["key"]
        with open(self.source, "rb") as f:
            t_cut = time.monotonic()
            plain_client.put_partial(server.data_addr, session["key"], key, f, self.size, self.cut)
            wait_for(lambda: server.api.file(key)["received"] == self.cut, 120, 0.01, "received == 90%")
            interrupted = time.monotonic() - t_cut
            t0 = time.monotonic()
            offset = plain_client.put(server.data_addr, session["key"], key, f, 0, self.size)
            seconds = time.monotonic() - t0
        if offset != self.cut:
            raise RuntimeError(f"server resumed from {offset}, not {self.cut}")
        delete_job(server, job["id"])
        return Sample(seconds, {"first_90_percent_seconds": interrupted})

    def stop(self) -> None:
        pass


class Fresh:
    """A fresh upload of a file as large as the resumed tail."""

    def __init__(self, server: ServerProcess, source, size: int) -> None:
        self.server, self.source = server, source
        self.cut = size * 9 // 10
        self.tail = size - self.cut
        self.figure = Figure("4-fresh", "fresh upload of the same 10% size", nbytes=self.tail)

    def start(self) -> None:
        pass

    def run_once(self, index: int) -> Sample:
        server = self.server
        job, files, session = server.job_with_files(f"bench-fresh-{uuid.uuid4().hex[:8]}", {"f": self.tail})
        with open(self.source, "rb") as f:
            t0 = time.monotonic()
            plain_client.put(server.data_addr, session["key"], files["f"]["key"], f, self.cut, self.tail)
            seconds = time.monotonic() - t0
        delete_job(server, job["id"])
        return Sample(seconds)

    def stop(self) -> None:
        pass


def run(size: int, runs: int) -> list[Figure]:
    with Workspace("resume") as work:
        say(f"case 4: resume a {human_size(size)} upload at 90% vs a fresh {human_size(size - size * 9 // 10)} "
            "upload; creating the source file")
        source = random_file(work / "source.bin", size)
        server = filedock_server(work / "filedock-data")
        try:
            resume, fresh = run_interleaved([Resume(server, source, size), Fresh(server, source, size)], runs)
        finally:
            server.stop()
    if resume.samples and fresh.samples:
        resume.notes.append(f"{resume.median_seconds / fresh.median_seconds:.2f}x the time of a fresh upload "
                            f"of {human_size(fresh.nbytes)} ({resume.median_seconds * 1000:.0f} ms vs "
                            f"{fresh.median_seconds * 1000:.0f} ms)")
    return [resume, fresh]
