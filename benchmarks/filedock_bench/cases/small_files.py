"""Case 5: many small files. 1000 files of 64 KiB: filedock with one session and one
versioned connection per file, one after another; filedock with one ``BATCH``; the
real CLI; and a Twisted program calling ``upload_job``, against ``rsync -r --fsync`` to a daemon copying the same directory (one
connection for all, pipelined). The connection-per-file and ``BATCH`` figures are also
measured with the metadata in PostgreSQL (a private one, ``fsync=on``, started here),
as a ratio to the same figure on SQLite in the same run."""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from pathlib import Path

from filedock_bench import plain_client
from filedock_bench.external_tools import RsyncDaemon, rsync_command
from filedock_bench.measure import Figure, Sample, median, run_interleaved, say
from filedock_bench.processes import run_timed
from filedock_bench.workspace import (PYTHON, ServerProcess, Workspace, delete_job, filedock_server, random_tree,
                                      remove)

COUNT = 1000
SIZE = 64 * 1024


class FiledockFiles:
    """Declare the files (one batch call, not timed), then PUT them one by one (timed)."""

    def __init__(self, server: ServerProcess, paths: list[Path], postgres: bool = False) -> None:
        self.server, self.paths = server, paths
        self.figure = Figure("5-filedock-pg" if postgres else "5-filedock",
                             f"{COUNT} x 64 KiB, filedock (connection per file)"
                             + (", metadata on PostgreSQL" if postgres else ""), nbytes=COUNT * SIZE, files=COUNT)

    def start(self) -> None:
        pass

    def run_once(self, index: int) -> Sample:
        api = self.server.api
        t_declare = time.monotonic()
        job = api.create_job(f"bench-small-{uuid.uuid4().hex[:8]}")
        declared = api.post(f"/v1/jobs/{job['id']}/files",
                            {"files": [{"name": p.name, "size": SIZE} for p in self.paths]})["files"]
        session = api.open_session(job["id"])
        declare = time.monotonic() - t_declare
        keys = {d["name"]: d["key"] for d in declared}
        t0 = time.monotonic()
        for p in self.paths:
            with open(p, "rb") as f:
                plain_client.put(self.server.data_addr, session["key"], keys[p.name], f, 0, SIZE)
        seconds = time.monotonic() - t0
        delete_job(self.server, job["id"])
        return Sample(seconds, {"declare_seconds": declare})

    def stop(self) -> None:
        pass


class BatchFiles:
    """Declare the files (not timed), then send them all in one ``BATCH`` with a plain client (timed)."""

    def __init__(self, server: ServerProcess, paths: list[Path], postgres: bool = False) -> None:
        self.server, self.paths = server, paths
        self.figure = Figure("5-filedock-batch-pg" if postgres else "5-filedock-batch",
                             f"{COUNT} x 64 KiB, filedock BATCH (one connection)"
                             + (", metadata on PostgreSQL" if postgres else ""), nbytes=COUNT * SIZE, files=COUNT)

    def start(self) -> None:
        pass

    def run_once(self, index: int) -> Sample:
        from filedock import wire
        from filedock.digest import ContentHasher

        api = self.server.api
        job = api.create_job(f"bench-batch-{uuid.uuid4().hex[:8]}")
        declared = api.post(f"/v1/jobs/{job['id']}/files",
                            {"files": [{"name": p.name, "size": SIZE} for p in self.paths]})["files"]
        session = api.open_session(job["id"])
        keys = {d["name"]: d["key"] for d in declared}
        t0 = time.monotonic()
        conn = wire.ClientConnection()
        with socket.create_connection(self.server.data_addr) as sock:
            sock.sendall(conn.send(wire.BatchRequest(session["key"], len(self.paths))))
            for p in self.paths:
                data = p.read_bytes()
                h = ContentHasher()
                h.update(data)
                sock.sendall(conn.send(wire.BatchItem(keys[p.name], len(data), h.hexdigest())) + data)
            sock.sendall(conn.send(wire.Done(None)))
            stored = 0
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                conn.receive_data(chunk)
                while (event := conn.next_event()) is not wire.NEED_DATA:
                    stored += isinstance(event, wire.ItemStored)
        seconds = time.monotonic() - t0
        if stored != len(self.paths):
            raise RuntimeError(f"the batch stored {stored} of {len(self.paths)} files")
        delete_job(self.server, job["id"])
        return Sample(seconds)

    def stop(self) -> None:
        pass


class CliFiles:
    """``filedock upload --job J --create --parallel N DIR``, the whole command timed (declare included)."""

    def __init__(self, server: ServerProcess, tree: Path, parallel: int) -> None:
        self.server, self.tree, self.parallel = server, tree, parallel
        self.figure = Figure(f"5-cli-p{parallel}", f"{COUNT} x 64 KiB, `filedock upload --parallel {parallel}`",
                             nbytes=COUNT * SIZE, files=COUNT)

    def start(self) -> None:
        pass

    def run_once(self, index: int) -> Sample:
        name = f"bench-small-cli-{uuid.uuid4().hex[:8]}"
        done = run_timed([PYTHON, "-m", "filedock", "upload", "--job", name, "--create", "--json",
                          "--parallel", str(self.parallel), str(self.tree)], env=self.server.env())
        if done.returncode != 0:
            raise RuntimeError(f"filedock upload exited {done.returncode}: {done.stderr[-500:]}")
        delete_job(self.server, name)
        return Sample(done.seconds)

    def stop(self) -> None:
        pass


class TwistedFiles:
    """A Twisted program calling ``upload_job`` on the directory, the whole process timed (like the CLI)."""

    def __init__(self, server: ServerProcess, tree: Path) -> None:
        self.server, self.tree = server, tree
        self.figure = Figure("5-twisted", f"{COUNT} x 64 KiB, Twisted client `upload_job`",
                             nbytes=COUNT * SIZE, files=COUNT)

    def start(self) -> None:
        pass

    def run_once(self, index: int) -> Sample:
        name = f"bench-small-tx-{uuid.uuid4().hex[:8]}"
        script = Path(__file__).resolve().parents[1] / "tx_upload.py"
        done = run_timed([PYTHON, str(script), name, str(self.tree)], env=self.server.env())
        if done.returncode != 0:
            raise RuntimeError(f"tx_upload.py exited {done.returncode}: {done.stderr[-500:]}")
        delete_job(self.server, name)
        return Sample(done.seconds)

    def stop(self) -> None:
        pass


class RsyncFiles:
    """``rsync -r --fsync DIR/ rsync://.../bench/run-N/``, the whole command timed."""

    def __init__(self, work: Path, tree: Path) -> None:
        self.tree = tree
        self.daemon = RsyncDaemon(work, work / "rsync")
        self.figure = Figure("5-rsync", f"{COUNT} x 64 KiB, rsync -r --fsync to daemon",
                             nbytes=COUNT * SIZE, files=COUNT)

    def start(self) -> None:
        self.daemon.start()

    def run_once(self, index: int) -> Sample:
        done = run_timed(rsync_command(f"{self.tree}/", self.daemon.url(f"run-{index}/"), recursive=True))
        if done.returncode != 0:
            raise RuntimeError(f"rsync exited {done.returncode}: {done.stderr[-500:]}")
        remove(self.daemon.root / f"run-{index}")
        return Sample(done.seconds)

    def stop(self) -> None:
        self.daemon.stop()


def run(runs: int) -> list[Figure]:
    from tests.engines.postgres import PostgresUnavailable, running_postgres

    with Workspace("small-files") as work, contextlib.ExitStack() as stack:
        say(f"case 5: {COUNT} files of 64 KiB, filedock vs rsync; creating the files")
        paths = random_tree(work / "tree", COUNT, SIZE)
        server = filedock_server(work / "filedock-data")
        pg_server, pg_skipped = None, None
        try:
            pg = stack.enter_context(running_postgres())
            pg_server = ServerProcess(work / "filedock-data-pg", metadata=pg.create_database("filedock")).start()
        except PostgresUnavailable as exc:
            pg_skipped = str(exc)
        try:
            cases = [FiledockFiles(server, paths), RsyncFiles(work, work / "tree"),
                     BatchFiles(server, paths), CliFiles(server, work / "tree", 1),
                     CliFiles(server, work / "tree", 8), TwistedFiles(server, work / "tree")]
            if pg_server is not None:
                cases += [FiledockFiles(pg_server, paths, postgres=True), BatchFiles(pg_server, paths, postgres=True)]
            ours, theirs, *cli = run_interleaved(cases, runs)
        finally:
            server.stop()
            if pg_server is not None:
                pg_server.stop()
    on_pg = [fig for fig in cli if fig.key.endswith("-pg")]
    cli = [fig for fig in cli if not fig.key.endswith("-pg")]
    if pg_skipped:
        on_pg = [Figure("5-filedock-pg", f"{COUNT} x 64 KiB, filedock (connection per file), metadata on PostgreSQL",
                        skipped=pg_skipped)]
    for fig, on_sqlite in zip(on_pg, (ours, cli[0])):
        if fig.samples and on_sqlite.samples:
            fig.notes.append(f"{fig.files_per_second:.0f} files/s vs {on_sqlite.files_per_second:.0f} on SQLite: "
                             f"{fig.files_per_second / on_sqlite.files_per_second:.2f}x SQLite (target 0.7x)")
    if ours.samples:
        declare = median(ours.extras("declare_seconds"))
        ours.notes.append(f"declaring the {COUNT} files (1 API call) took {declare:.2f} s more, not counted")
    if ours.samples and theirs.samples:
        ours.notes.append(f"{ours.files_per_second:.0f} files/s vs rsync {theirs.files_per_second:.0f} files/s "
                          f"({ours.files_per_second / theirs.files_per_second:.2f}x)")
    for fig in cli:
        if fig.samples and theirs.samples and fig.key.startswith(("5-cli", "5-twisted")):
            fig.notes.append(f"the whole command (start-up, declaring, session) included; "
                             f"{fig.files_per_second / theirs.files_per_second:.2f}x rsync")
    batch = cli[0]
    if batch.samples and theirs.samples:
        batch.notes.append(f"declaring not timed, as above; {batch.files_per_second / theirs.files_per_second:.2f}x "
                           "rsync")
    return [ours, theirs, *cli, *on_pg]
