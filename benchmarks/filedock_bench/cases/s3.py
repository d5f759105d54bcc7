"""Case 6: one large upload into S3-compatible object storage (SeaweedFS), through filedock and straight.

(6a) a plain client sends the file to a filedock server whose blobs are in a
SeaweedFS bucket (``--blobs s3://...``): the clock stops at ``STORED``, after the
multipart upload was completed. (6b) the same file into the same bucket with
boto3's multipart transfer (``upload_file``) at the same part size and the same
number of parts in flight as filedock's writer. Both run interleaved against one
``weed mini``; the ratio 6a/6b is taken in the same run.
"""

from __future__ import annotations

import time
import uuid

from filedock.store.s3 import S3PartialWriter, part_size_for
from filedock_bench import plain_client
from filedock_bench.measure import Figure, Sample, Skip, human_size, median, run_interleaved, say
from filedock_bench.workspace import ServerProcess, Workspace, delete_job, random_file


class _Shared:
    def __init__(self, source, size, work, target) -> None:
        self.source, self.size, self.work, self.target = source, size, work, target


class ThroughFiledock:
    """(6a) plain client -> filedock data port -> SeaweedFS bucket, ``STORED`` at the end."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.server: ServerProcess | None = None
        self.figure = Figure("6a", "into SeaweedFS through filedock (plain client, --blobs s3://)",
                             nbytes=shared.size)

    def start(self) -> None:
        t = self.shared.target
        self.server = ServerProcess(self.shared.work / "filedock-s3-data", blobs=t.blobs_url("bench"),
                                    server_env=t.env()).start()

    def run_once(self, index: int) -> Sample:
        server, size = self.server, self.shared.size
        job, files, session = server.job_with_files(f"bench-s3-{index}-{uuid.uuid4().hex[:6]}", {"f": size})
        with open(self.shared.source, "rb") as f:
            t0 = time.monotonic()
            offset = plain_client.put(server.data_addr, session["key"], files["f"]["key"], f, 0, size)
            seconds = time.monotonic() - t0
        if offset:
            raise RuntimeError(f"a fresh upload resumed at {offset}")
        delete_job(server, job["id"])
        return Sample(seconds)

    def stop(self) -> None:
        if self.server:
            self.server.stop()


class StraightBoto3:
    """(6b) boto3 ``upload_file`` into the same bucket: same part size, same parts in flight."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.figure = Figure("6b", "straight into SeaweedFS with boto3's multipart transfer", nbytes=shared.size)

    def start(self) -> None:
        from boto3.s3.transfer import TransferConfig

        part = part_size_for(self.shared.size)
        self.config = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                                     max_concurrency=S3PartialWriter.PARTS_IN_FLIGHT, use_threads=True)
        self.client = self.shared.target.client()
        self.figure.notes.append(f"part size {human_size(part)}, {S3PartialWriter.PARTS_IN_FLIGHT} parts in flight")

    def run_once(self, index: int) -> Sample:
        key = f"bench-straight/{uuid.uuid4()}"
        t = self.shared.target
        t0 = time.monotonic()
        self.client.upload_file(str(self.shared.source), t.bucket, key, Config=self.config)
        seconds = time.monotonic() - t0
        self.client.delete_object(Bucket=t.bucket, Key=key)
        return Sample(seconds)

    def stop(self) -> None:
        pass


def run(size: int, runs: int) -> list[Figure]:
    """Case 6: 6a and 6b interleaved ``runs`` times against one private SeaweedFS; 6a/6b per run."""
    try:
        from tests.engines.seaweedfs import SeaweedServer, SeaweedUnavailable
    except ImportError as exc:  # boto3 or the fixture module missing
        raise SystemExit(f"run.py: case s3 needs the test extra (make test): {exc}")
    with Workspace("s3") as work:
        say(f"case 6: one {human_size(size)} upload into SeaweedFS, through filedock and straight with boto3")
        try:
            weed = SeaweedServer()
        except SeaweedUnavailable as exc:
            a, b = Figure("6a", "into SeaweedFS through filedock"), Figure("6b", "straight with boto3")
            a.skipped = b.skipped = str(exc)
            return [a, b]
        try:
            weed.start()
            shared = _Shared(random_file(work / "source.bin", size), size, work, weed.new_bucket())
            figures = run_interleaved([ThroughFiledock(shared), StraightBoto3(shared)], runs)
        finally:
            weed.stop()
    a, b = figures
    if a.samples and b.samples:
        ratios = [sb.seconds / sa.seconds for sa, sb in zip(a.samples, b.samples)]
        ratio = median(b.seconds) / median(a.seconds)
        a.notes.append(f"{ratio:.2f} x 6b (medians); per run {min(ratios):.2f}-{max(ratios):.2f} x; "
                       f"6a {min(a.seconds):.2f}-{max(a.seconds):.2f} s, 6b {min(b.seconds):.2f}-"
                       f"{max(b.seconds):.2f} s")
        say(f"  6a/6b: {ratio:.2f} x (per run {', '.join(f'{r:.2f}' for r in ratios)})")
    return figures


__all__ = ["run", "Skip"]
