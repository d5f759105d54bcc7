"""A private Ceph cluster with a RADOS Gateway, for the S3 conformance tests (``make test-ceph``).

One monitor and one OSD (BlueStore on a sparse file) and one ``radosgw``, all in a temporary
directory under their own cluster name, config file and fsid, so nothing reads or writes
``/etc/ceph``, ``/var/lib/ceph`` or a cluster the machine already runs. Auth is ``none`` (loopback
only, torn down after the session). The gateway listens on a free loopback port, never 7480
(filedock's default API port, which is also the gateway's default).

Use :func:`ceph_s3` as a context manager, or the session-scoped ``ceph_s3`` fixture (import it into
a conftest or test module). Both yield a :class:`CephS3` with the endpoint, keys and region; at the
end every daemon started here is stopped (SIGTERM, then SIGKILL) and the directory is removed.

Debian packages: ``apt-get install --no-install-recommends ceph-mon ceph-osd radosgw``. Without
them the fixture skips with that advice, except under ``CI``, where it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

CLUSTER = "filedocktest"
REGION = "default"  # RGW's zonegroup is the region S3 clients sign for
REQUIRED_BINARIES = ("monmaptool", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph")
INSTALL_HINT = "apt-get install --no-install-recommends ceph-mon ceph-osd radosgw"
START_TIMEOUT = 120.0  # seconds for the whole start; one step rarely takes more than 15 here
# Ports the gateway must never take: filedock's default API and data ports.
RESERVED_PORTS = {7480, 7481}


class CephStartError(RuntimeError):
    """The cluster or gateway did not come up; the message carries the daemon's log tail."""


@dataclass(frozen=True)
class CephS3:
    """What an S3 client needs to reach the gateway, plus facts tests check."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    root: Path  # the temporary directory; gone after the fixture ends
    pids: tuple[int, ...]  # the daemons started (monitor, OSD, gateway)
    start_seconds: float

    def __iter__(self):
        """Unpack as ``endpoint, access_key, secret_key, region``."""
        return iter((self.endpoint, self.access_key, self.secret_key, self.region))


def missing_binaries() -> list[str]:
    """The Ceph programs this fixture needs that are not on ``PATH``."""
    return [name for name in REQUIRED_BINARIES if shutil.which(name) is None]


def _free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _config(root: Path, fsid: str, mon_port: int, rgw_port: int) -> str:
    return f"""\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
mon initial members = a
ms bind msgr1 = false
public network = 127.0.0.0/8
# tests only, on loopback: no cephx
auth cluster required = none
auth service required = none
auth client required = none
# without crc here the gateway waits 300 s on get_initial_auth_request returned -13
ms mon client mode = crc
ms client mode = crc
# one OSD: one copy, and no failure domain wider than the OSD
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
# everything under the temporary directory, nothing in /etc/ceph, /var/lib/ceph or /var/run/ceph
run dir = {root}/run
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log
mon cluster log file = {root}/log/cluster.log
crash dir = {root}/crash
keyring = {root}/keyring
log to stderr = false
err to stderr = false
log to syslog = false

[mon]
mon data = {root}/mon
mon data avail crit = 1
mon data avail warn = 2

[osd]
osd data = {root}/osd
osd objectstore = bluestore
bluestore block path = {root}/osd.block
bluestore block create = true
# sparse: takes only what is written
bluestore block size = 8589934592
bluestore fsck on mkfs = false
osd memory target = 1073741824

[client]
rgw data = {root}/rgw
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw dns name = 127.0.0.1
"""


class _Cluster:
    """The daemons and their directory; :meth:`stop` undoes whatever :meth:`start` got to."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="filedock-ceph-"))
        self.conf = self.root / f"{CLUSTER}.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.mon_port = _free_port()
        self.rgw_port = _free_port()
        while self.rgw_port == self.mon_port:
            self.rgw_port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        self.access_key = "FD" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.deadline = 0.0

    # -- helpers ---------------------------------------------------------------------------------

    def _base(self, program: str, name: str | None = None) -> list[str]:
        cmd = [program, "--cluster", CLUSTER, "-c", str(self.conf)]
        if name:
            cmd += ["-n", name]
        return cmd

    def _run(self, args: list[str], what: str, log: Path | None = None,
             timeout: float = 30.0) -> str:
        timeout = max(1.0, min(timeout, self.deadline - time.monotonic()))
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise CephStartError(f"{what}: no answer in {timeout:.0f} s ({' '.join(args)})"
                                 + self._logs(log)) from None
        if done.returncode != 0:
            raise CephStartError(f"{what}: exit {done.returncode} ({' '.join(args)})\n"
                                 f"{done.stdout}{done.stderr}" + self._logs(log))
        return done.stdout

    def _logs(self, log: Path | None) -> str:
        return f"\n--- tail of {log} ---\n{_tail(log)}" if log else ""

    def _spawn(self, key: str, args: list[str]) -> None:
        out = open(self.root / "log" / f"{key}.out", "wb")
        with out:
            self.procs[key] = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=subprocess.STDOUT)

    def _check_alive(self, key: str, log: Path) -> None:
        proc = self.procs[key]
        if proc.poll() is not None:
            raise CephStartError(f"{key} exited with {proc.returncode}"
                                 + self._logs(self.root / "log" / f"{key}.out") + self._logs(log))

    # -- start -----------------------------------------------------------------------------------

    def start(self) -> CephS3:
        began = time.monotonic()
        self.deadline = began + START_TIMEOUT
        for sub in ("run", "log", "crash", "mon", "osd", "rgw"):
            (self.root / sub).mkdir()
        fsid = str(uuid.uuid4())
        self.conf.write_text(_config(self.root, fsid, self.mon_port, self.rgw_port))

        # monitor
        mon_log = self.root / "log" / "mon.a.log"
        monmap = self.root / "monmap"
        self._run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                   f"[v2:127.0.0.1:{self.mon_port}]", str(monmap)], "monmaptool")
        self._run(self._base("ceph-mon") + ["-i", "a", "--mkfs", "--monmap", str(monmap)],
                  "ceph-mon --mkfs", mon_log)
        self._spawn("mon", self._base("ceph-mon") + ["-i", "a", "-f"])
        # `ceph osd new` waits for the monitor to answer
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph(["osd", "new", osd_uuid], "ceph osd new", mon_log).strip()
        self._check_alive("mon", mon_log)

        # OSD: BlueStore on a sparse file in the directory
        osd_log = self.root / "log" / f"osd.{osd_id}.log"
        self._run(self._base("ceph-osd") + ["-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid],
                  "ceph-osd --mkfs", osd_log, timeout=60)
        self._spawn("osd", self._base("ceph-osd") + ["-i", osd_id, "-f"])
        self._wait(lambda: self._osd_up(osd_id), "the OSD to come up", "osd", osd_log)

        # gateway: it creates its pools on first start, then answers HTTP
        rgw_log = self.root / "log" / "client.rgw.a.log"
        self._spawn("rgw", self._base("radosgw", "client.rgw.a") + ["-f"])
        self._wait(self._rgw_answers, f"the gateway to answer on {self.endpoint}", "rgw", rgw_log)

        self._run(self._base("radosgw-admin", "client.admin")
                  + ["user", "create", "--uid=filedock-test", "--display-name=filedock tests",
                     f"--access-key={self.access_key}", f"--secret-key={self.secret_key}"],
                  "radosgw-admin user create", rgw_log)
        self._wait(self._s3_signed_answers, "the S3 user to be usable", "rgw", rgw_log)
        return CephS3(self.endpoint, self.access_key, self.secret_key, REGION, self.root,
                      tuple(p.pid for p in self.procs.values()), time.monotonic() - began)

    def _ceph(self, args: list[str], what: str, log: Path | None) -> str:
        return self._run(self._base("ceph", "client.admin") + ["--connect-timeout", "20"] + args,
                         what, log)

    def _wait(self, ready, what: str, key: str, log: Path) -> None:
        while True:
            self._check_alive(key, log)
            if ready():
                return
            if time.monotonic() > self.deadline:
                raise CephStartError(f"timed out after {START_TIMEOUT:.0f} s waiting for {what}"
                                     + self._logs(log))
            time.sleep(0.25)

    def _osd_up(self, osd_id: str) -> bool:
        out = self._ceph(["osd", "dump", "--format", "json"], "ceph osd dump", None)
        return any(str(o["osd"]) == osd_id and o["up"] and o["in"]
                   for o in json.loads(out)["osds"])

    def _rgw_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:
            return True  # any S3 error document means the gateway is serving
        except OSError:
            return False

    def _s3_signed_answers(self) -> bool:
        import boto3
        import botocore.config
        import botocore.exceptions

        client = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(connect_timeout=2, read_timeout=5,
                                          retries={"max_attempts": 1}))
        try:
            client.list_buckets()
            return True
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            return False

    # -- stop ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every daemon started here (gateway first), then remove the directory."""
        for key in ("rgw", "osd", "mon"):
            proc = self.procs.get(key)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for key in ("rgw", "osd", "mon"):
            proc = self.procs.get(key)
            if proc is None:
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def ceph_s3() -> Iterator[CephS3]:
    """Start the cluster and gateway, yield how to reach them, and stop and remove everything."""
    cluster = _Cluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def require_ceph() -> None:
    """Skip (or, under ``CI``, fail) when Ceph's programs are not installed."""
    missing = missing_binaries()
    if missing:
        message = f"Ceph is not installed ({', '.join(missing)} missing): {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# Each test module that imports the fixture below gets its own session-scoped definition of it
# (pytest keys fixtures by the module that holds them), so the cluster is shared here instead:
# the first user starts it, the last one stops it. A failed start is not retried.
_session: dict = {"cluster": None, "s3": None, "error": None, "users": 0}


@pytest.fixture(scope="session")
def ceph_s3_endpoint() -> Iterator[CephS3]:
    """A running RADOS Gateway for the whole session: ``endpoint, access_key, secret_key, region``."""
    require_ceph()
    if _session["error"] is not None:
        raise CephStartError(f"the session's Ceph cluster did not start: {_session['error']}")
    if _session["users"] == 0:
        cluster = _Cluster()
        try:
            _session["s3"] = cluster.start()
        except BaseException as exc:
            cluster.stop()
            _session["error"] = exc
            raise
        _session["cluster"] = cluster
    _session["users"] += 1
    try:
        yield _session["s3"]
    finally:
        _session["users"] -= 1
        if _session["users"] == 0:
            _session["cluster"].stop()
            _session["cluster"] = _session["s3"] = None


@pytest.fixture
def ceph_bucket(ceph_s3_endpoint):
    """A fresh bucket on the session's gateway, as the blob-interface tests take an S3 engine
    (an ``S3Target``); emptied (objects and multipart uploads) and removed after the test."""
    from tests.engines.seaweedfs import S3Target, empty_bucket

    ceph = ceph_s3_endpoint
    target = S3Target(ceph.endpoint, ceph.access_key, ceph.secret_key,
                      f"fd-{secrets.token_hex(8)}", ceph.region)
    client = target.client()
    client.create_bucket(Bucket=target.bucket)
    yield target
    empty_bucket(client, target.bucket)
