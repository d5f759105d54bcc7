"""``Link``: two network namespaces joined by the user-space relay in ``relay.py``.

::

    with Link(rtt_ms=100, loss=0.001, rate_mbit=1000, mtu=1500) as link:
        subprocess.run(link.receiver.command(["python", "-m", "filedock", "serve", ...]))
        subprocess.run(link.sender.command(["python", "-m", "filedock", "upload", ...]))
        # the receiver listens on link.receiver_address

Only the two namespaces this object creates are configured (addresses, MTU, routes);
nothing is applied to the host's own interfaces, routes or sysctls. On exit, also after
an exception or Ctrl-C, every process left in the namespaces is killed, the relay is
stopped and the namespaces are deleted. Namespaces are named ``fdwan<pid>-<n>s`` /
``fdwan<pid>-<n>r``; those of a process that no longer exists (a run that was killed)
are removed by the next ``Link``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

PREFIX = "fdwan"
_NAME = re.compile(rf"^{PREFIX}(\d+)-\d+[sr]$")
SENDER_ADDRESS = "10.213.0.1"
RECEIVER_ADDRESS = "10.213.0.2"
TUN = "wan0"
RELAY = Path(__file__).resolve().parent / "relay.py"
RELAY_C = RELAY.with_suffix(".c")
RELAY_BUILD = Path(__file__).resolve().parents[2] / "build" / "wan-relay"
"""Where the C relay is compiled (git-ignored ``build/``), one binary per source hash."""
RELAY_ENV = "FILEDOCK_WAN_RELAY"
"""``c`` or ``python`` forces that relay; unset (or ``auto``): the C one where a compiler builds it."""
_serial = count(1)
log = logging.getLogger("filedock.wan")


def c_relay() -> tuple[Path | None, str | None]:
    """The C relay's binary, compiled with the machine's ``cc -O2`` on first use and cached by the
    source's hash; or (None, why not) when it cannot be built."""
    source = RELAY_C.read_bytes()
    binary = RELAY_BUILD / f"relay-{hashlib.sha256(source).hexdigest()[:16]}"
    if binary.exists():
        return binary, None
    wanted = os.environ.get("CC") or "cc"
    compiler = shutil.which(wanted)
    if compiler is None:
        return None, f"no C compiler ({wanted}) found (apt-get install gcc)"
    RELAY_BUILD.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    done = subprocess.run([compiler, "-O2", "-Wall", "-o", str(partial), str(RELAY_C)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        return None, f"{compiler} failed: {done.stderr.strip()[-500:]}"
    os.replace(partial, binary)  # atomic: a concurrent Link sees no half-written binary
    return binary, None


def relay_command(kind: str = "auto") -> tuple[list[str], str]:
    """The argv prefix of the relay to run and which it is (``c`` or ``python``): ``kind`` (or
    ``$FILEDOCK_WAN_RELAY``) ``auto`` prefers C and falls back to relay.py with a logged reason."""
    kind = os.environ.get(RELAY_ENV, kind) if kind == "auto" else kind
    if kind not in ("auto", "c", "python"):
        raise ValueError(f"relay must be auto, c or python: {kind!r}")
    if kind == "python":
        return [sys.executable, str(RELAY)], "python"
    binary, why = c_relay()
    if binary is not None:
        return [str(binary)], "c"
    if kind == "c":
        raise LinkUnavailable(f"the C relay cannot be built: {why}")
    log.warning("WAN emulator: using the Python relay (its ceiling is below 1 Gbit/s at MTU 1500): %s", why)
    return [sys.executable, str(RELAY)], "python"


class LinkUnavailable(RuntimeError):
    """This machine cannot run the emulator (not root, no ``ip``, no ``/dev/net/tun``)."""


def unavailable_reason() -> str | None:
    """None if a ``Link`` can be built here, else why not (for a test's skip message)."""
    if os.geteuid() != 0:
        return "the WAN emulator needs root (network namespaces and TUN devices)"
    if shutil.which("ip") is None:
        return "the WAN emulator needs iproute2's `ip` (apt-get install iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "the WAN emulator needs /dev/net/tun (the tun module)"
    return None


@dataclass
class Namespace:
    """One end of the link: ``command(argv)`` runs ``argv`` inside it."""

    name: str
    address: str

    @property
    def prefix(self) -> list[str]:
        """The argv prefix that runs a command in this namespace."""
        return ["ip", "netns", "exec", self.name]

    def command(self, argv: list[str]) -> list[str]:
        return [*self.prefix, *argv]

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one."""
        proc = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in proc.stdout.split()]


@dataclass
class Link:
    """An emulated path: ``rtt_ms`` round trip (half each way), ``loss`` (fraction, each direction),
    ``rate_mbit`` (each direction, 0 = unlimited) with a drop-tail queue of ``queue_bytes`` (default:
    one bandwidth-delay product, at least 64 KiB), ``mtu`` on both TUN devices. ``seed`` makes the
    loss pattern repeatable. ``relay_cpu`` pins the relay to one CPU (default: the last one, when
    there are several). ``relay``: ``auto`` (the C relay, relay.py if it cannot be built), ``c``
    or ``python``; ``relay_kind`` says which one ran. ``offload`` (C relay only) lets the two stacks
    pass TCP segments to the relay in TSO/GRO batches of up to 64 KiB, each segment still one wire
    packet of the model; False makes every read one packet, as relay.py sees them."""

    rtt_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float = 0.0
    mtu: int = 1500
    queue_bytes: int | None = None
    seed: int = 1
    relay_cpu: int | None = -1
    relay: str = "auto"
    offload: bool = True
    relay_kind: str = field(init=False, default="")
    sender: Namespace = field(init=False)
    receiver: Namespace = field(init=False)
    relay_counts: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be a fraction in [0, 1): {self.loss}")
        if self.rtt_ms < 0 or self.rate_mbit < 0:
            raise ValueError("rtt_ms and rate_mbit must not be negative")
        if not 576 <= self.mtu <= 65535:
            raise ValueError(f"mtu out of range: {self.mtu}")
        if self.queue_bytes is None:
            bdp = self.rate_mbit * 1e6 / 8 * self.rtt_ms / 1000
            self.queue_bytes = max(int(bdp), 64 * 1024)
        if self.relay_cpu == -1:
            cpus = sorted(os.sched_getaffinity(0))
            self.relay_cpu = cpus[-1] if len(cpus) > 1 else None
        serial = next(_serial)
        self.sender = Namespace(f"{PREFIX}{os.getpid()}-{serial}s", SENDER_ADDRESS)
        self.receiver = Namespace(f"{PREFIX}{os.getpid()}-{serial}r", RECEIVER_ADDRESS)
        self._relay: subprocess.Popen | None = None

    @property
    def receiver_address(self) -> str:
        return self.receiver.address

    # -- life cycle

    def __enter__(self) -> "Link":
        reason = unavailable_reason()
        if reason:
            raise LinkUnavailable(reason)
        remove_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _build(self) -> None:
        for ns in (self.sender, self.receiver):
            _ip("netns", "add", ns.name)
            _ip("-n", ns.name, "link", "set", "lo", "up")
        self._start_relay()
        for ns, peer in ((self.sender, self.receiver), (self.receiver, self.sender)):
            _ip("-n", ns.name, "link", "set", TUN, "mtu", str(self.mtu), "txqueuelen", "1000", "up")
            _ip("-n", ns.name, "addr", "add", ns.address, "peer", f"{peer.address}/32", "dev", TUN)

    def _start_relay(self) -> None:
        prefix, self.relay_kind = relay_command(self.relay)
        cmd = [*prefix, "--sender-ns", self.sender.name, "--receiver-ns", self.receiver.name,
               "--tun", TUN, "--delay-ms", repr(self.rtt_ms / 2), "--loss", repr(self.loss),
               "--rate-mbit", repr(self.rate_mbit), "--queue-bytes", str(self.queue_bytes),
               "--seed", str(self.seed)]
        if self.relay_cpu is not None:
            cmd += ["--cpu", str(self.relay_cpu)]
        if self.relay_kind == "c" and not self.offload:
            cmd += ["--no-offload"]
        # its own process group: a Ctrl-C meant for the test must not stop the relay before close() does
        self._relay = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, start_new_session=True)
        if not select.select([self._relay.stdout], [], [], 15)[0]:
            raise RuntimeError("the WAN relay did not start within 15 s")
        line = self._relay.stdout.readline()
        if not line:
            self._relay.wait(5)
            raise RuntimeError(f"the WAN relay exited {self._relay.returncode}: "
                               f"{self._relay.stderr.read().decode(errors='replace')[-1000:]}")

    def close(self) -> None:
        """Kill what runs in the namespaces, stop the relay (keeping its counters), delete both namespaces."""
        for ns in (self.sender, self.receiver):
            _kill_all(ns.pids() if _exists(ns.name) else [])
        if self._relay is not None:
            relay, self._relay = self._relay, None
            try:
                out, _ = relay.communicate(timeout=5)
                lines = out.decode().strip().splitlines()
                if lines:
                    self.relay_counts = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.communicate()
        for ns in (self.sender, self.receiver):
            if _exists(ns.name):
                _ip("netns", "del", ns.name)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a killed child of ours stays a zombie until reaped; it no longer holds anything
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def namespaces() -> list[str]:
    """The names of this emulator's namespaces that exist now (any process's)."""
    try:
        return sorted(n for n in os.listdir("/run/netns") if _NAME.match(n))
    except FileNotFoundError:
        return []


def remove_stale() -> list[str]:
    """Delete the namespaces (and kill their processes) of ``Link``s whose process is gone."""
    removed = []
    for name in namespaces():
        pid = int(_NAME.match(name).group(1))
        if pid == os.getpid() or _alive(pid):
            continue  # a live Link, ours or another process's
        _kill_all(Namespace(name, "").pids())
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        removed.append(name)
    return removed
