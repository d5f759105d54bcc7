"""Case 6: two servers behind HAProxy, 8 concurrent uploads: aggregate against one server's.

Three contenders, interleaved (A B C A B C ...), each taking ``size`` bytes in 8
concurrent uploads (case 3's plain sendfile clients, one session):

- ``8-one``: one server as a single site runs it (SQLite, its own data dir, no balancer);
- ``8-one-lb``: one server behind HAProxy with metadata in PostgreSQL (what the balancer
  and the database cost on their own);
- ``8-two``: two servers behind HAProxy sharing PostgreSQL and one data dir.

The figure to read is ``8-two`` against ``8-one`` (the goal: at least 0.9x); the notes
give that ratio for each round of the interleaving, so its spread shows.
"""

from __future__ import annotations

import shutil

from filedock_bench.cases.concurrency import upload_concurrently
from filedock_bench.measure import Figure, Sample, Skip, human_size, median, run_interleaved, say
from filedock_bench.workspace import Workspace, filedock_server, random_file

CONCURRENT = 8


class OneServer:
    """One server on SQLite, clients straight to it."""

    def __init__(self, work, source, size: int) -> None:
        self.work, self.source, self.size = work, source, size
        self.server = None
        self.figure = Figure("8-one", f"{CONCURRENT} uploads, one server (SQLite, direct)", nbytes=size)

    def start(self) -> None:
        self.server = filedock_server(self.work / "one-data")

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
        say(f"case 6: {human_size(size)} in {CONCURRENT} concurrent uploads: one server, one behind HAProxy on "
            "PostgreSQL, two behind HAProxy; creating the source file")
        source = random_file(work / "source.bin", size)
        try:
            postgres_cm = running_postgres()
            postgres = postgres_cm.__enter__()
        except PostgresUnavailable:
            postgres_cm = postgres = None
        try:
            variants = [OneServer(work, source, size), Balanced(work, source, size, 1, postgres),
                        Balanced(work, source, size, 2, postgres)]
            figures = run_interleaved(variants, runs)
        finally:
            if postgres_cm is not None:
                postgres_cm.__exit__(None, None, None)
    one, _, two = figures
    if one.samples and two.samples:
        rounds = [a.seconds / b.seconds for a, b in zip(one.samples, two.samples)]
        two.notes.append(f"{two.mbps / one.mbps:.2f}x one server's (8-one) median; per round "
                         + ", ".join(f"{r:.2f}x" for r in rounds) + f" (median {median(rounds):.2f}x)")
    return figures
