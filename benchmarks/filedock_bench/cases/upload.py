"""Case 1: one large upload over loopback, durable at the end, seven ways side by side.

(a) ``filedock upload`` end to end, (b) the raw limit, (c) the 2007 design on
Python 3, (d) the filedock server fed by a plain client (versioned dialect, and the
2007 header with polling), (e) rsync --fsync to a daemon and socat, (f) one tus PATCH
from curl (cases/http_upload.py).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from filedock_bench import plain_client
from filedock_bench.cases.http_upload import TusCurlPatch
from filedock_bench.cases.tus_node import NodeTusServerPatch, TusJsUpload, note_ratios
from filedock_bench.external_tools import RsyncDaemon, require, rsync_command, socat_listener, socat_sender
from filedock_bench.measure import Figure, Sample, Skip, human_size, median, run_interleaved, say
from filedock_bench.processes import HelperServer, process_cpu_seconds, run_timed
from filedock_bench.tls_tools import ScpUpload, SftpUpload, SocatTlsUpload
from filedock_bench.workspace import (PYTHON, ServerProcess, Workspace, delete_job, filedock_server, log_since,
                                      log_size, random_file, remove, wait_for)

VARIANTS = ("cli", "cli-auto", "raw", "twisted2007", "dataport", "dataport-2007", "rsync", "socat", "cli-tls",
            "cli-tls-twisted", "socat-tls", "scp", "sftp", "tus-curl", "tus-node", "tus-js", "tus-js-parallel")
"""Names for ``--only``; ``raw`` always runs, as every ratio is against it."""

SEPARATE = ("cli-tls", "cli-tls-twisted", "socat-tls", "scp", "sftp")
"""Variants run in a round of their own after the others (measured all the same, against the same (b))."""

_OUTCOME = re.compile(r"upload complete: .* seconds=([0-9.]+) rate=")


@dataclass
class UploadSetup:
    """What every variant of case 1 shares: the source file, a filedock server, a work dir."""

    source: Path
    size: int
    work: Path
    server: ServerProcess | None = None


def cli_available() -> str | None:
    """None if ``filedock upload`` exists, else why not."""
    proc = subprocess.run([PYTHON, "-m", "filedock", "upload", "--help"], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"`filedock upload` does not exist here: {proc.stderr.strip()[-200:]}"


class CliUpload:
    """(a) ``python -m filedock upload --job J --create --json FILE``, the whole command timed."""

    EXTRA: list[str] = []  # more upload flags (a variant's)

    def __init__(self, setup: UploadSetup) -> None:
        self.setup = setup
        self.figure = Figure("1a", "filedock upload (CLI), whole command", nbytes=setup.size)

    def start(self) -> None:
        reason = cli_available()
        if reason:
            raise Skip(reason)

    def run_once(self, index: int) -> Sample:
        server = self.setup.server
        startup = run_timed([PYTHON, "-m", "filedock", "--help"]).seconds
        name = f"bench-cli-{index}-{uuid.uuid4().hex[:8]}"
        mark = log_size(server)
        server_cpu = process_cpu_seconds(server.proc.pid)
        done = run_timed([PYTHON, "-m", "filedock", "upload", "--job", name, "--create", "--json", *self.EXTRA,
                          str(self.setup.source)], env=server.env())
        server_cpu_after = process_cpu_seconds(server.proc.pid)
        if done.returncode != 0:
            raise RuntimeError(f"filedock upload exited {done.returncode}: {done.stderr.strip()[-500:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if result.get("state") != "complete":
            raise RuntimeError(f"filedock upload did not complete: {result}")
        extra = {"startup_seconds": startup, "client_max_rss_kib": done.max_rss_kib,
                 "client_cpu_seconds": round(done.cpu_seconds, 3)}
        if server_cpu is not None and server_cpu_after is not None:
            extra["server_cpu_seconds"] = round(server_cpu_after - server_cpu, 3)
        if result.get("streams"):
            extra["streams"] = result["streams"]["streams"]
        found = _OUTCOME.findall(wait_for(lambda: _complete_line(server, mark), 10, what="server log line"))
        if found:
            extra["server_seconds"] = float(found[-1])
        delete_job(server, name)
        return Sample(done.seconds, extra)

    def stop(self) -> None:
        pass


class CliUploadTls(CliUpload):
    """(a-tls) the same command against a server speaking TLS on both ports (certificate verified)."""

    def __init__(self, setup: UploadSetup) -> None:
        super().__init__(UploadSetup(setup.source, setup.size, setup.work))
        self.figure = Figure("1a-tls", "filedock upload (CLI) over TLS on both ports, whole command",
                             nbytes=setup.size)

    DATA_TLS = ""
    """``FILEDOCK_DATA_TLS`` for the server: empty is the data port's own TLS (``tls_fast``)."""

    def start(self) -> None:
        super().start()
        from tests.integration.harness import tls_files

        tls_dir = self.setup.work / f"tls-{self.DATA_TLS or 'fast'}"  # each server its own pair
        tls_dir.mkdir(exist_ok=True)
        key, cert = tls_files(tls_dir)
        saved = os.environ.get("FILEDOCK_DATA_TLS")
        os.environ["FILEDOCK_DATA_TLS"] = self.DATA_TLS
        try:
            self.setup.server = ServerProcess(self.setup.work / f"filedock-tls{self.DATA_TLS}-data",
                                              tls=(key, cert)).start()
        finally:
            if saved is None:
                os.environ.pop("FILEDOCK_DATA_TLS", None)
            else:
                os.environ["FILEDOCK_DATA_TLS"] = saved
        self.cert = cert
        how = "Twisted's TLS protocol" if self.DATA_TLS else "pyOpenSSL on memory BIOs (tls_fast)"
        suite = "AES-256-GCM (OpenSSL's default)" if self.DATA_TLS else "AES-128-GCM (the server's preference)"
        client = "the standard library's ssl" if os.environ.get("FILEDOCK_CLIENT_TLS") == "stdlib" else \
            "pyOpenSSL on the socket (client/tls.py)"
        self.figure.notes.append(f"TLS 1.3 {suite}, ECDSA P-256 certificate; data port: {how}; client: {client}")

    def stop(self) -> None:
        if self.setup.server:
            self.setup.server.stop()


class CliUploadTlsTwisted(CliUploadTls):
    """(a-tls-twisted) the same, with the data port on Twisted's own TLS (pyOpenSSL), for the A/B."""

    DATA_TLS = "twisted"

    def __init__(self, setup: UploadSetup) -> None:
        super().__init__(setup)
        self.figure = Figure("1a-tls-twisted", "filedock upload (CLI) over TLS, data port on Twisted's pyOpenSSL",
                             nbytes=setup.size)


class RawLimitTlsRound:
    """(b) again, interleaved with the TLS round, so its ratios can also be read within one interleaving."""

    def __new__(cls, setup: UploadSetup) -> "RawLimit":
        raw = RawLimit(setup)
        raw.dest = setup.work / "raw-tls-round"
        raw.sink = HelperServer("raw_sink.py", ["--dir", str(raw.dest)], setup.work)
        raw.figure = Figure("1b-tls-round", "raw limit, measured again within the TLS round", nbytes=setup.size)
        return raw


class CliUploadAuto(CliUpload):
    """(a-auto) the same command with ``--streams auto`` on loopback: it must not be slower than one stream
    (issue 14: at least 0.95x (a))."""

    EXTRA = ["--streams", "auto"]

    def __init__(self, setup: UploadSetup) -> None:
        super().__init__(setup)
        self.figure = Figure("1a-auto", "filedock upload --streams auto (CLI), whole command", nbytes=setup.size)


def _complete_line(server: ServerProcess, mark: int) -> str:
    text = log_since(server, mark)
    return text if "upload complete:" in text else ""


class RawLimit:
    """(b) recv_into a 1 MiB buffer + os.write in a plain Python process, fed by sendfile; one fsync."""

    def __init__(self, setup: UploadSetup) -> None:
        self.setup = setup
        self.dest = setup.work / "raw"
        self.sink = HelperServer("raw_sink.py", ["--dir", str(self.dest)], setup.work)
        self.figure = Figure("1b", "raw limit: recv_into + os.write, fsync", nbytes=setup.size)

    def start(self) -> None:
        self.dest.mkdir(exist_ok=True)
        self.sink.start()

    def run_once(self, index: int) -> Sample:
        with open(self.setup.source, "rb") as f:
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", self.sink.port)) as sock:
                sock.sendfile(f)
                sock.shutdown(socket.SHUT_WR)
                reply = plain_client.LineReader(sock).line()
            seconds = time.monotonic() - t0
        _, total, name = reply.split()
        remove(self.dest / name)
        if int(total) != self.setup.size:
            raise RuntimeError(f"raw sink got {total} bytes")
        return Sample(seconds)

    def stop(self) -> None:
        self.sink.stop()


class Design2007:
    """(c) Twisted LineReceiver server (raw mode, file write + zlib.crc32, fsync) and FileSender client."""

    def __init__(self, setup: UploadSetup) -> None:
        self.setup = setup
        self.dest = setup.work / "design2007"
        self.server = HelperServer("design2007.py", ["serve", "--dir", str(self.dest)], setup.work)
        self.figure = Figure("1c", "2007 design on Python 3 (Twisted, 64 KiB FileSender)", nbytes=setup.size)

    def start(self) -> None:
        self.dest.mkdir(exist_ok=True)
        self.server.start()

    def run_once(self, index: int) -> Sample:
        key = str(uuid.uuid4())
        client = run_timed([PYTHON, str(Path(self.server.cmd[1])), "send", "--port", str(self.server.port),
                            "--session", str(uuid.uuid4()), "--file", key, str(self.setup.source)])
        if client.returncode != 0:
            raise RuntimeError(f"2007 client exited {client.returncode}: {client.stderr[-500:]}")
        report = self.server.next_json(600)
        sent = json.loads(client.stdout.strip().splitlines()[-1])
        remove(self.dest / key)
        if report["bytes"] != self.setup.size or report["file"] != key:
            raise RuntimeError(f"2007 server stored {report}")
        return Sample(report["t_durable"] - sent["t0"], {"client_process_seconds": client.seconds})

    def stop(self) -> None:
        self.server.stop()


class DataportPut:
    """(d) the filedock server alone: ``FILEDOCK/1 PUT``, sendfile, ``DONE``; timed until ``STORED``."""

    def __init__(self, setup: UploadSetup) -> None:
        self.setup = setup
        self.figure = Figure("1d", "filedock server alone (versioned PUT, until STORED)", nbytes=setup.size)

    def start(self) -> None:
        pass

    def run_once(self, index: int) -> Sample:
        server = self.setup.server
        job, files, session = server.job_with_files(f"bench-d-{index}-{uuid.uuid4().hex[:8]}",
                                                    {"source.bin": self.setup.size})
        with open(self.setup.source, "rb") as f:
            t0 = time.monotonic()
            plain_client.put(server.data_addr, session["key"], files["source.bin"]["key"], f, 0, self.setup.size)
            seconds = time.monotonic() - t0
        delete_job(server, job["id"])
        return Sample(seconds)

    def stop(self) -> None:
        pass


class DataportLegacy:
    """(d') the filedock server, 2007 header + sendfile + close; timed until GET /v1/files shows complete."""

    POLL = 0.002

    def __init__(self, setup: UploadSetup) -> None:
        self.setup = setup
        self.figure = Figure("1d-2007", "filedock server alone (2007 header, poll until complete)",
                             nbytes=setup.size)

    def start(self) -> None:
        pass

    def run_once(self, index: int) -> Sample:
        server = self.setup.server
        job, files, session = server.job_with_files(f"bench-d7-{index}-{uuid.uuid4().hex[:8]}",
                                                    {"source.bin": self.setup.size})
        key = files["source.bin"]["key"]
        with open(self.setup.source, "rb") as f:
            t0 = time.monotonic()
            plain_client.send_2007(server.data_addr, session["key"], key, f, self.setup.size)
            sent = time.monotonic() - t0
            # poll only once the client has closed, so the polling does not load the server mid-stream
            wait_for(lambda: server.api.file(key)["state"] == "complete", 600, self.POLL, "file complete")
            seconds = time.monotonic() - t0
        delete_job(server, job["id"])
        return Sample(seconds, {"client_sent_seconds": sent})

    def stop(self) -> None:
        pass


class RsyncUpload:
    """(e) ``rsync --fsync FILE rsync://127.0.0.1:P/bench/``, the whole client command timed."""

    def __init__(self, setup: UploadSetup) -> None:
        self.setup = setup
        self.daemon = RsyncDaemon(setup.work, setup.work / "rsync")
        self.figure = Figure("1e-rsync", "rsync --fsync to rsync daemon", nbytes=setup.size)

    def start(self) -> None:
        self.daemon.start()

    def run_once(self, index: int) -> Sample:
        done = run_timed(rsync_command(str(self.setup.source), self.daemon.url()))
        if done.returncode != 0:
            raise RuntimeError(f"rsync exited {done.returncode}: {done.stderr[-500:]}")
        remove(self.daemon.root / self.setup.source.name)
        return Sample(done.seconds)

    def stop(self) -> None:
        self.daemon.stop()


class SocatUpload:
    """(e) ``socat -u FILE TCP`` into ``socat -u -b 1048576 TCP-LISTEN OPEN:file``, then fsync of the file."""

    def __init__(self, setup: UploadSetup) -> None:
        self.setup = setup
        self.dest = setup.work / "socat.bin"
        self.figure = Figure("1e-socat", "socat -> socat -b 1048576, then fsync", nbytes=setup.size)

    def start(self) -> None:
        require("socat")

    def run_once(self, index: int) -> Sample:
        listener, port = socat_listener(self.dest)
        try:
            t0 = time.monotonic()
            sender = subprocess.run(socat_sender(self.setup.source, port), capture_output=True)
            listener.wait(600)
            _fsync(self.dest)
            seconds = time.monotonic() - t0
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
        if sender.returncode != 0 or self.dest.stat().st_size != self.setup.size:
            raise RuntimeError(f"socat failed ({sender.returncode}): {sender.stderr[-300:]!r}")
        remove(self.dest)
        return Sample(seconds)

    def stop(self) -> None:
        remove(self.dest)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CLASSES = {"cli": CliUpload, "raw": RawLimit, "twisted2007": Design2007, "dataport": DataportPut,
           "dataport-2007": DataportLegacy, "rsync": RsyncUpload, "socat": SocatUpload, "cli-tls": CliUploadTls,
           "cli-tls-twisted": CliUploadTlsTwisted, "socat-tls": SocatTlsUpload, "scp": ScpUpload, "sftp": SftpUpload,
           "tus-curl": TusCurlPatch, "tus-node": NodeTusServerPatch, "tus-js": lambda setup: TusJsUpload(setup, 1),
           "tus-js-parallel": lambda setup: TusJsUpload(setup, 4), "cli-auto": CliUploadAuto}


def run(size: int, runs: int, only: set[str]) -> list[Figure]:
    """Case 1 with the chosen variants (``raw`` always), interleaved ``runs`` times."""
    names = [n for n in VARIANTS if n in only or n == "raw"]
    with Workspace("upload") as work:
        say(f"case 1: one {human_size(size)} upload, variants {', '.join(names)}; creating the source file")
        setup = UploadSetup(random_file(work / "source.bin", size), size, work)
        if {"cli", "cli-auto", "dataport", "dataport-2007", "tus-curl", "tus-js", "tus-js-parallel"} & set(names):
            setup.server = filedock_server(work / "filedock-data")
        try:
            # TLS (no target) runs after the others, in its own round: 3 s of both cores busy with TLS
            # made the host hold back the contender after it (see benchmarks/README.md)
            figures = run_interleaved([CLASSES[n](setup) for n in names if n not in SEPARATE], runs,
                                      alternate=("1a", "1a-auto"))
            tls_round = [CLASSES[n](setup) for n in names if n in SEPARATE]
            if tls_round:
                tls_round.insert(0, RawLimitTlsRound(setup))
            figures += run_interleaved(tls_round, runs)
        finally:
            if setup.server:
                setup.server.stop()
    note_ratios(figures)
    _auto_note(figures)
    return figures + _cli_side_figures(figures)


def _auto_note(figures: list[Figure]) -> None:
    """(a-auto) as a ratio to (a), from the medians and per run (the runs are interleaved)."""
    one = next((f for f in figures if f.key == "1a" and f.samples), None)
    auto = next((f for f in figures if f.key == "1a-auto" and f.samples), None)
    if one is None or auto is None:
        return
    per_run = sorted(a / b for a, b in zip(one.seconds, auto.seconds))
    streams = sorted(set(auto.extras("streams"))) or [1]
    auto.notes.append(f"**{auto.mbps / one.mbps:.3f}x one stream (1a)** (runs {per_run[0]:.3f}-{per_run[-1]:.3f}); "
                      f"auto chose {'/'.join(map(str, streams))} stream(s)")


def _cli_side_figures(figures: list[Figure]) -> list[Figure]:
    """From (a)'s runs: the data phase the server saw, and the interpreter + import start-up."""
    cli = next((f for f in figures if f.key == "1a"), None)
    if cli is None or not cli.samples:
        return []
    data = Figure("1a-data", "filedock upload (CLI), from first data byte", nbytes=cli.nbytes,
                  samples=[Sample(s) for s in cli.extras("server_seconds")])
    data.notes.append("server log: OFFSET sent -> recorded complete (includes the client's wait for its "
                      "own digest before DONE); excludes start-up and API calls")
    startup = Figure("1a-startup", "`python -m filedock --help` (interpreter + imports)",
                     samples=[Sample(s) for s in cli.extras("startup_seconds")])
    startup.value = median(startup.seconds)
    startup.value_unit = "s"
    return [data, startup]
