"""Case 8: two servers behind HAProxy, 8 concurrent uploads: aggregate against one server's.

Three contenders, interleaved (A B C A B C ...), each taking ``size`` bytes in 8
concurrent uploads (case 3's plain sendfile clients, one session), all with metadata
and the upload registry in the same PostgreSQL (its own database each):

- ``8-one``: one server, clients straight to it (no balancer);
- ``8-one-lb``: one server behind HAProxy (the same deployment as ``8-two`` with one
  server: what the issue's "one server's" most naturally means);
- ``8-two``: two servers behind HAProxy sharing one data dir.

The goal is ``8-two`` at least 0.9x one server's. Its notes give both readings, against
``8-one-lb`` and against ``8-one``, for the medians and for each round of the
interleaving (their spread).
"""

from __future__ import annotations

import shutil

from filedock_bench.cases.concurrency import upload_concurrently
from filedock_bench.measure import Figure, Sample, Skip, human_size, median, run_interleaved, say
from filedock_bench.workspace import Workspace, random_file

CONCURRENT = 8


class OneServer:
    """One server on PostgreSQL, clients straight to it."""

    def __init__(self, work, source, size: int, postgres) -> None:
        self.work, self.source, self.size, self.postgres = work, source, size, postgres
        self.server = None
        self.figure = Figure("8-one", f"{CONCURRENT} uploads, one server (PostgreSQL, direct)", nbytes=size)

    def start(self) -> None:
        from tests.integration.harness import ServerProcess

        if self.postgres is None:
            raise Skip("PostgreSQL is missing: apt-get install -y postgresql")
        self.server = ServerProcess(self.work / "one-data", metadata=self.postgres.create_database("bench_direct"))
        self.server.start()

    def run_once(self, index: int) -> Sample:
        return Sample(upload_concurrently(self.server, self.source, self.size, CONCURRENT, "one"))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class Balanced:
    """``count`` servers behind HAProxy on one PostgreSQL database and one data dir."""

    def __init__(self, work, source, size: int, count: int, postgres) -> None:
        self.work, self.source, self.size, self.count, self.postgres = work, source, size, count, postgres
        self.cluster = None
        key = "8-two" if count == 2 else "8-one-lb"
        title = (f"{CONCURRENT} uploads, two servers behind HAProxy (PostgreSQL, shared data dir)" if count == 2
                 else f"{CONCURRENT} uploads, one server behind HAProxy (PostgreSQL)")
        self.figure = Figure(key, title, nbytes=size)

    def start(self) -> None:
        from tests.integration.cluster import BLOB_SETUPS, Cluster

        if shutil.which("haproxy") is None:
            raise Skip("HAProxy is missing: apt-get install -y haproxy")
        if self.postgres is None:
            raise Skip("PostgreSQL is missing: apt-get install -y postgresql")
        root = self.work / f"cluster-{self.count}"
        root.mkdir()
        dsn = self.postgres.create_database(f"bench_{self.count}")
        self.cluster = Cluster(root, dsn, BLOB_SETUPS["shared-dir"], [], count=self.count).start()

    def run_once(self, index: int) -> Sample:
        return Sample(upload_concurrently(self.cluster, self.source, self.size, CONCURRENT, f"lb{self.count}"))

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


def run(size: int, runs: int) -> list[Figure]:
    from tests.engines.postgres import PostgresUnavailable, running_postgres

    with Workspace("several-servers") as work:
        say(f"case 8: {human_size(size)} in {CONCURRENT} concurrent uploads on PostgreSQL: one server direct, one "
            "behind HAProxy, two behind HAProxy; creating the source file")
        source = random_file(work / "source.bin", size)
        try:
            postgres_cm = running_postgres()
            postgres = postgres_cm.__enter__()
        except PostgresUnavailable:
            postgres_cm = postgres = None
        try:
            variants = [OneServer(work, source, size, postgres), Balanced(work, source, size, 1, postgres),
                        Balanced(work, source, size, 2, postgres)]
            figures = run_interleaved(variants, runs)
        finally:
            if postgres_cm is not None:
                postgres_cm.__exit__(None, None, None)
    one, one_lb, two = figures
    for base, how in ((one_lb, "one server behind the same HAProxy (8-one-lb)"), (one, "one server direct (8-one)")):
        if base.samples and two.samples:
            two.notes.append(f"{ratio_note(base, two)} {how}")
    return figures


def ratio_note(base: Figure, figure: Figure) -> str:
    """``figure`` against ``base``: the medians' ratio, and each round's (same round of the interleaving)."""
    rounds = [b.seconds / f.seconds for b, f in zip(base.samples, figure.samples)]
    return (f"{figure.mbps / base.mbps:.2f}x (per round " + ", ".join(f"{r:.2f}" for r in rounds)
            + f"; {min(rounds):.2f}-{max(rounds):.2f}) of")
