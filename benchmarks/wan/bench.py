"""Case 6 (``wan``): one upload across the emulated long, lossy link, filedock beside rsync and scp.

Two links, each 1 Gbit/s with MTU 1500 and 100 ms RTT: one clean, one losing 0.1 % of packets
each way. On each, interleaved: ``filedock upload`` of one file with one stream, rsync over ssh
(``--fsync``) and scp (then an fsync of the copy), each once with a CUBIC sender and once with a
BBR sender, and (clean link only) a bare TCP stream with the default socket buffers and with
``SO_SNDBUF`` raised, to show what the buffers allow. The filedock server and sshd run in the
receiver's namespace, every client in the sender's; whole commands are timed (start-up and API
round trips across the 100 ms included). Rows give MB/s and, in the notes, the fraction of the
link rate. Needs root, /dev/net/tun and (for rsync/scp) sshd: ``apt-get install openssh-server``,
which this case tries once when sshd is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from filedock_bench.measure import MB, Figure, Sample, Skip, human_size, run_interleaved, say
from filedock_bench.external_tools import ensure_sshd
from filedock_bench.processes import run_timed
from filedock_bench.workspace import PYTHON, Workspace, random_file, remove, wait_for

from .link import Link, unavailable_reason

RTT_MS = 100
RATE_MBIT = 1000
MTU = 1500
LINK_BYTES_PER_S = RATE_MBIT * 1e6 / 8
LINKS = (("clean", 0.0), ("lossy", 0.001))
SENDERS = ("cubic", "bbr")
PROBE = str(Path(__file__).resolve().parent / "probe.py")
SSH_CIPHER = "aes128-gcm@openssh.com"


@dataclass
class WanSetup:
    """One link with a filedock server and an sshd on its receiving side."""

    link: Link
    tag: str
    source: Path
    size: int
    work: Path
    env: dict[str, str] = field(default_factory=dict)
    ssh_key: Path | None = None
    ssh_missing: str | None = None

    def key(self, what: str) -> str:
        return f"7-{self.tag}-{what}"

    def title(self, what: str) -> str:
        loss = "no loss" if not self.link.loss else f"{self.link.loss * 100:g} % loss"
        return f"{what}, {RTT_MS} ms {loss}, {human_size(self.size)}"


def _sender_note(fig: Figure, cc: str) -> None:
    fig.notes.append(f"sender {cc}")


def _fraction_note(fig: Figure) -> list[str]:
    if not fig.samples:
        return []
    rates = sorted(fig.nbytes / s / LINK_BYTES_PER_S for s in fig.seconds)
    med = fig.mbps * MB / LINK_BYTES_PER_S
    return [f"**{med:.3f}x link** (runs {rates[0]:.3f}–{rates[-1]:.3f})"]


class FiledockWan:
    """``filedock upload --congestion-control CC [--streams K]`` of one file, whole command; with ``cc``
    None no ``--congestion-control``: filedock chooses (client/pathtune.py: BBR on a long path where
    the kernel offers it, whatever the machine's default), and the row notes what it chose."""

    def __init__(self, setup: WanSetup, cc: str | None, streams: str | None = None) -> None:
        self.setup, self.cc, self.streams = setup, cc, streams
        sender = cc or "chosen"
        tag = f"filedock-streams{streams}-{sender}" if streams else f"filedock-{sender}"
        how = cc or "congestion control chosen by filedock"
        label = f"filedock upload --streams {streams} ({how})" if streams else f"filedock upload ({how})"
        self.figure = Figure(setup.key(tag), setup.title(label), nbytes=setup.size)
        if cc:
            _sender_note(self.figure, cc)

    def start(self) -> None:
        pass

    def run_once(self, index: int) -> Sample:
        s = self.setup
        name = f"wan-{index}-{uuid.uuid4().hex[:8]}"
        done = run_timed(s.link.sender.command([PYTHON, "-m", "filedock", "upload", "--job", name, "--create",
                                                "--json", *(["--congestion-control", self.cc] if self.cc else []),
                                                *(["--streams", self.streams] if self.streams else []),
                                                str(s.source)]),
                         env=s.env)
        if done.returncode != 0:
            raise RuntimeError(f"filedock upload exited {done.returncode}: {done.stderr.strip()[-500:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        streams = row.get("streams") or {}
        used = streams.get("congestion_control") or row.get("congestion_control")
        if row.get("state") != "complete" or (self.cc and used != self.cc):
            raise RuntimeError(f"filedock upload: {row}")
        _delete_job(s, name)
        extra = {"congestion_control": used}
        if streams:
            extra["streams"] = streams["streams"]
            extra["congestion_control_reason"] = streams.get("congestion_control_reason")
        if not self.cc and index == 0:
            self.figure.notes.append(f"sender {used} ({streams.get('congestion_control_reason')})")
        return Sample(done.seconds, extra)

    def stop(self) -> None:
        pass


_DELETE_JOB = """
import json, os, sys, urllib.request as u
def call(method, path):
    req = u.Request(os.environ["FILEDOCK_URL"].rstrip("/") + path, method=method,
                    headers={"Authorization": "Bearer " + os.environ["FILEDOCK_TOKEN"]})
    with u.urlopen(req) as reply:
        return json.loads(reply.read() or b"null")
listing = call("GET", "/v1/jobs")
jobs = listing["jobs"] if isinstance(listing, dict) else listing
for job in jobs:
    if job["name"] == sys.argv[1]:
        call("DELETE", "/v1/jobs/" + job["id"])
"""


def _delete_job(s: WanSetup, name: str) -> None:
    """Delete the job named ``name`` (untimed), asked from the sender's side: the API is across the link."""
    done = subprocess.run(s.link.sender.command([PYTHON, "-c", _DELETE_JOB, name]), env=s.env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"deleting job {name}: {done.stderr.strip()[-300:]}")


class _SshCopy:
    """Shared by rsync and scp: ssh whose TCP connection is socat's, with ``TCP_CONGESTION`` set on it
    (the namespace's default cannot be changed here, and ssh has no option for it)."""

    tool = ""

    def __init__(self, setup: WanSetup, cc: str) -> None:
        self.setup, self.cc = setup, cc
        self.dest = setup.work / f"ssh-dest-{setup.tag}"
        self.figure = Figure(setup.key(f"{self.tool}-{cc}"), setup.title(self.label), nbytes=setup.size)
        _sender_note(self.figure, cc)
        self.figure.notes.append(f"ssh -c {SSH_CIPHER}")

    label = ""

    def start(self) -> None:
        if self.setup.ssh_missing:
            raise Skip(self.setup.ssh_missing)
        self.dest.mkdir(exist_ok=True)

    def ssh_options(self) -> list[str]:
        return ["-F", "/dev/null", "-i", str(self.setup.ssh_key), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-c", SSH_CIPHER, "-o", f"ProxyCommand={shutil.which('socat')} - "
                                        f"TCP:%h:%p,setsockopt-string=6:13:{self.cc}"]

    def stop(self) -> None:
        remove(self.dest)


class RsyncSsh(_SshCopy):
    """``rsync --fsync -e ssh FILE root@receiver:DIR/``, whole command."""

    tool = "rsync"
    label = "rsync --fsync over ssh"

    def run_once(self, index: int) -> Sample:
        s = self.setup
        ssh = " ".join(_quote(a) for a in ["ssh", *self.ssh_options()])
        done = run_timed(s.link.sender.command([shutil.which("rsync"), "--fsync", "-e", ssh, str(s.source),
                                                f"root@{s.link.receiver_address}:{self.dest}/"]))
        if done.returncode != 0:
            raise RuntimeError(f"rsync exited {done.returncode}: {done.stderr[-500:]}")
        _check_and_remove(self.dest / s.source.name, s.size)
        return Sample(done.seconds)


class Scp(_SshCopy):
    """``scp FILE root@receiver:DIR/``, then an fsync of the copy (timed: scp does not fsync)."""

    tool = "scp"
    label = "scp, then fsync"

    def run_once(self, index: int) -> Sample:
        s = self.setup
        target = self.dest / s.source.name
        t0 = time.monotonic()
        done = run_timed(s.link.sender.command([shutil.which("scp"), "-q", *self.ssh_options(), str(s.source),
                                                f"root@{s.link.receiver_address}:{target}"]))
        _fsync(target)
        seconds = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"scp exited {done.returncode}: {done.stderr[-500:]}")
        _check_and_remove(target, s.size)
        return Sample(seconds)


class BareStream:
    """A plain TCP stream of ``size`` bytes (probe.py, BBR), with the default buffers or ``SO_SNDBUF``
    set to the host's ``net.core.wmem_max``: what the socket buffers allow at this RTT."""

    def __init__(self, setup: WanSetup, sndbuf: int) -> None:
        self.setup, self.sndbuf = setup, sndbuf
        what = "default buffers" if not sndbuf else f"SO_SNDBUF = wmem_max {human_size(sndbuf)} (the kernel doubles it)"
        self.figure = Figure(setup.key("tcp-" + ("default" if not sndbuf else "sndbuf")),
                             setup.title(f"bare TCP stream (bbr), {what}"), nbytes=setup.size)
        self.sink: subprocess.Popen | None = None
        self.port = 5301 if not sndbuf else 5302

    def start(self) -> None:
        self.sink = subprocess.Popen(self.setup.link.receiver.command(
            [PYTHON, PROBE, "tcp-sink", "--port", str(self.port)]), stdout=subprocess.PIPE, text=True)
        if "listening" not in self.sink.stdout.readline():
            raise RuntimeError(f"probe sink on port {self.port} did not start")

    def run_once(self, index: int) -> Sample:
        s = self.setup
        done = subprocess.run(s.link.sender.command([PYTHON, PROBE, "tcp-source", "--to",
                                                     f"{s.link.receiver_address}:{self.port}", "--cc", "bbr",
                                                     "--bytes", str(s.size), "--sndbuf", str(self.sndbuf)]),
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout)
        info = result["tcp_info"]
        return Sample(result["seconds"], {"sndbuf": result["sndbuf"],
                                          "sndbuf_limited_s": info.get("sndbuf_limited_us", 0) / 1e6,
                                          "rwnd_limited_s": info.get("rwnd_limited_us", 0) / 1e6})

    def stop(self) -> None:
        if self.sink and self.sink.poll() is None:
            self.sink.kill()
            self.sink.wait()
            self.sink.stdout.close()


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_and_remove(path: Path, size: int) -> None:
    got = path.stat().st_size if path.exists() else None
    remove(path)
    if got != size:
        raise RuntimeError(f"{path.name}: {got} bytes arrived, not {size}")


# -- the servers on the receiving side


def start_filedock(setup: WanSetup) -> None:
    """``filedock serve`` in the receiver's namespace, on its link address; the client environment."""
    data, ready = setup.work / f"filedock-{setup.tag}", setup.work / f"filedock-{setup.tag}-ready.json"
    addr = setup.link.receiver_address
    log = open(setup.work / f"filedock-{setup.tag}.log", "ab")
    subprocess.Popen(setup.link.receiver.command(
        [PYTHON, "-m", "filedock", "serve", "--data-dir", str(data), "--api-listen", f"tcp:7480:interface={addr}",
         "--data-listen", f"tcp:7481:interface={addr}:backlog=1024", "--ready-file", str(ready),
         "--issue-admin-token"]), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_for(ready.exists, 60, 0.05, "filedock server ready in the receiver namespace")
    info = json.loads(ready.read_text())
    setup.env = {**os.environ, "FILEDOCK_URL": info["api_url"], "FILEDOCK_TOKEN": info["token"]}


def start_sshd(setup: WanSetup) -> None:
    """sshd in the receiver's namespace with a throw-away host key, accepting one throw-away key for root."""
    setup.ssh_missing = ensure_sshd()
    if setup.ssh_missing:
        return
    d = setup.work / f"ssh-{setup.tag}"
    d.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    conf = d / "sshd_config"
    conf.write_text(f"ListenAddress {setup.link.receiver_address}\nPort 22\nHostKey {d / 'host'}\n"
                    f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
                    "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    "UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    subprocess.Popen(setup.link.receiver.command(["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)]),
                     stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "ab"))
    setup.ssh_key = d / "client"
    probe = ["ssh", *_SshCopy(setup, "bbr").ssh_options(), f"root@{setup.link.receiver_address}", "true"]
    wait_for(lambda: subprocess.run(setup.link.sender.command(probe), capture_output=True).returncode == 0,
             30, 0.2, "sshd answering in the receiver namespace")


def run(size: int, lossy_size: int, runs: int, baseline_size: int | None = None,
        tools_size: int | None = None) -> list[Figure]:
    """Case 7 on both links; every figure skipped with the reason where the emulator cannot run. On the
    lossy link the rows that stay far below the link (one stream: filedock, rsync, scp; and every
    CUBIC sender) move ``baseline_size`` bytes (default ``lossy_size``): a CUBIC stream moves about
    1 MB/s there, and 2 GiB would take over half an hour. On the clean link rsync and scp move
    ``tools_size`` bytes (default ``size``): they stay near 0.15x the link (ssh's own window)."""
    reason = unavailable_reason()
    baseline_size = baseline_size or lossy_size
    keys = [(tag, what) for tag, _ in LINKS for what in
            [f"{tool}-{cc}" for tool in ("filedock", "filedock-streams8", "filedock-streamsauto", "rsync", "scp")
             for cc in SENDERS] + ["filedock-streamsauto-chosen"]]
    if reason:
        say(f"case 7 (wan): skipped: {reason}")
        return [Figure(f"7-{tag}-{what}", "WAN", skipped=reason) for tag, what in keys]
    figures: list[Figure] = []
    with Workspace("wan") as work:
        tools_size = tools_size or size
        biggest = max(size, lossy_size, baseline_size, tools_size)
        say(f"case 7 (wan): {RTT_MS} ms, {RATE_MBIT} Mbit/s, MTU {MTU}; clean link {human_size(size)}, "
            f"0.1 % loss {human_size(lossy_size)} (one stream: {human_size(baseline_size)}); creating the source file")
        source = random_file(work / "wan-source.bin", biggest)
        parts: dict[int, Path] = {biggest: source}

        def part(n: int) -> Path:
            if n not in parts:
                parts[n] = _prefix_copy(source, work / f"wan-source-{n}.bin", n)
            return parts[n]

        for tag, loss in LINKS:
            n = size if not loss else lossy_size
            with Link(rtt_ms=RTT_MS, loss=loss, rate_mbit=RATE_MBIT, mtu=MTU) as link:
                setup = WanSetup(link, tag, part(n), n, work)
                start_filedock(setup)
                start_sshd(setup)
                one = setup if not loss else replace(setup, source=part(baseline_size), size=baseline_size)
                tools = one if loss else replace(setup, source=part(tools_size), size=tools_size)
                variants = [FiledockWan(one, cc) for cc in SENDERS]
                variants += [cls(tools, cc) for cls in (RsyncSsh, Scp) for cc in SENDERS]
                # a CUBIC sender under loss stays near the Mathis rate however many streams (8 x ~1 MB/s)
                variants += [FiledockWan(one if cc == "cubic" else setup, cc, streams) for streams in ("8", "auto")
                             for cc in SENDERS]
                variants.append(FiledockWan(setup, None, "auto"))
                if not loss:
                    variants += [BareStream(setup, 0), BareStream(setup, _wmem_max())]
                say(f"  link {tag}: {link.rtt_ms:g} ms, loss {link.loss:g}, {link.rate_mbit:g} Mbit/s, "
                    f"queue {human_size(link.queue_bytes)}, {link.relay_kind} relay")
                done = run_interleaved(variants, runs)
            for fig in done:
                fig.notes[:0] = _fraction_note(fig)
            say(f"  relay counters ({tag}): {json.dumps(link.relay_counts)}")
            figures += done
    return figures


def _wmem_max() -> int:
    with open("/proc/sys/net/core/wmem_max") as f:
        return int(f.read())


def _prefix_copy(source: Path, dest: Path, size: int) -> Path:
    with open(source, "rb") as src, open(dest, "wb") as out:
        left = size
        while left:
            chunk = src.read(min(left, 16 << 20))
            out.write(chunk)
            left -= len(chunk)
        os.fsync(out.fileno())
    return dest
