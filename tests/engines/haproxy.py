"""HAProxy in front of several filedock servers, for tests and benchmarks.

``BalancerConfig`` holds the ports; ``config_text`` writes the configuration that
docs/deploy.md shows ("Running several servers"): TCP mode for both ports, the
PROXY protocol v2 toward the backends (which listen on ``haproxy:tcp:...``
endpoints), health checks every second, a short connect timeout and
``option redispatch`` with ``retries``, so a connection to a dead server is
retried on a live one before the client sees a failure.

``HAProxy(config, directory).start()`` runs ``haproxy -f cfg -db`` (in the
foreground, a child of the test) and waits until both frontends accept;
``reload(config)`` starts a new process with ``-sf`` (the old one finishes its
connections); ``stop()`` ends it; ``wait_backends_up()`` waits for the health checks.

If the binary is missing a test is skipped with how to install it, but when the
environment variable ``CI`` is set it fails instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_HINT = "HAProxy is missing: apt-get install -y haproxy (Debian's package; nothing starts on install)"


def haproxy_binary() -> str:
    """The ``haproxy`` command, or the test skips (fails under CI) with how to install it."""
    path = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy")
    if not path:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {INSTALL_HINT}", pytrace=False)
        pytest.skip(INSTALL_HINT)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class BalancerConfig:
    """The frontends' ports and the backends' (api_port, data_port) pairs, all on 127.0.0.1."""

    backends: list[tuple[int, int]]
    api_port: int = field(default_factory=free_port)
    data_port: int = field(default_factory=free_port)
    check_interval_ms: int = 1000
    connect_timeout_ms: int = 1000
    idle_timeout: str = "10m"  # above the servers' idle_timeout (120 s): filedock decides when a client is idle


def config_text(cfg: BalancerConfig, stats_socket: Path | None = None) -> str:
    """HAProxy's configuration for ``cfg`` (the text docs/deploy.md explains)."""
    lines = [
        "global",
        "    maxconn 4096                      # each spliced connection also takes a pipe: keep the FDs under the limit",
        "    tune.pipesize 1048576             # 1 MiB per splice, not the kernel's 64 KiB: a quarter of the CPU",
        *([f"    stats socket {stats_socket} mode 600 level admin"] if stats_socket else []),
        "",
        "defaults",
        "    mode tcp                          # filedock's ports are not HTTP to the balancer",
        f"    timeout connect {cfg.connect_timeout_ms}ms            # a dead server is given up on quickly",
        f"    timeout client {cfg.idle_timeout}                # a stalled upload is filedock's to time out",
        f"    timeout server {cfg.idle_timeout}",
        "    retries 3                         # a refused connection is tried again...",
        "    option redispatch 1               # ...on another server each time",
        "    option splice-request             # upload bytes move by kernel splice from the first byte,",
        "    option splice-response            # downloads too (splice-auto copied a large share first)",
        "",
        "frontend api",
        f"    bind 127.0.0.1:{cfg.api_port}",
        "    default_backend api_servers",
        "",
        "frontend data",
        f"    bind 127.0.0.1:{cfg.data_port}",
        "    default_backend data_servers",
        "",
        "backend api_servers",
        "    balance roundrobin",
    ]
    check = f"check inter {cfg.check_interval_ms}ms fall 2 rise 1 check-send-proxy"
    for n, (api, _) in enumerate(cfg.backends):
        lines.append(f"    server fd{n} 127.0.0.1:{api} send-proxy-v2 {check}")
    lines += ["", "backend data_servers", "    balance leastconn                 # uploads are long: spread them by count"]
    for n, (_, data) in enumerate(cfg.backends):
        lines.append(f"    server fd{n} 127.0.0.1:{data} send-proxy-v2 {check}")
    return "\n".join(lines) + "\n"


class HAProxy:
    """One HAProxy process in ``directory`` (its configuration, stats socket and log live there)."""

    def __init__(self, config: BalancerConfig, directory: Path) -> None:
        self.binary = haproxy_binary()
        self.config = config
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cfg_path = self.directory / "haproxy.cfg"
        self.stats_socket = self.directory / "haproxy.sock"
        self.log_path = self.directory / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.config.api_port}/"

    def _write(self) -> None:
        self.cfg_path.write_text(config_text(self.config, self.stats_socket))
        check = subprocess.run([self.binary, "-c", "-q", "-f", str(self.cfg_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refuses its configuration: {check.stdout}{check.stderr}")

    def _spawn(self, *extra: str) -> subprocess.Popen:
        log = open(self.log_path, "ab")
        try:
            return subprocess.Popen([self.binary, "-db", "-f", str(self.cfg_path), *extra],
                                    stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def start(self, timeout: float = 15.0) -> "HAProxy":
        """Write the configuration, start, and wait until both frontends accept connections."""
        self._write()
        self.proc = self._spawn()
        self._wait_listening(timeout)
        return self

    def reload(self, config: BalancerConfig | None = None, timeout: float = 15.0) -> None:
        """Apply a new configuration without dropping connections: a new process takes the ports,
        the old one (``-sf``) finishes what it carries."""
        if config is not None:
            self.config = config
        self._write()
        old = self.proc
        self.proc = self._spawn("-sf", str(old.pid))
        self._wait_listening(timeout)
        try:
            old.wait(timeout)
        except subprocess.TimeoutExpired:
            pass  # still carrying long connections: it ends when they do

    def stop(self) -> None:
        """End HAProxy (and its connections) and wait for it."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "HAProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for port in (self.config.api_port, self.config.data_port):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"haproxy exited with {self.proc.returncode}: {self.log()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"haproxy not listening on {port} after {timeout} s: {self.log()}")
                    time.sleep(0.05)

    def backend_states(self) -> dict[str, str]:
        """``{"data_servers/fd0": "UP", ...}`` from the stats socket."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
        states = {}
        for row in out.decode().splitlines():
            fields = row.split(",")
            if len(fields) > 17 and fields[1] not in ("FRONTEND", "BACKEND", "svname"):
                states[f"{fields[0]}/{fields[1]}"] = fields[17]
        return states

    def wait_backends(self, state: str = "UP", names: list[str] | None = None, timeout: float = 15.0) -> None:
        """Wait until the health checks see every backend server (or ``names``) in ``state``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = self.backend_states()
            except (FileNotFoundError, ConnectionRefusedError):
                # HAProxy makes its stats socket under a temporary name and renames it: not there yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            wanted = {k: v for k, v in states.items() if names is None or k.split("/")[1] in names}
            if wanted and all(v.startswith(state) for v in wanted.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"backends not {state} after {timeout} s: {states}")
            time.sleep(0.1)

    def log(self) -> str:
        """HAProxy's own output so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""
