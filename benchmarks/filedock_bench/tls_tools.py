"""The encrypted yardsticks for ``filedock upload --tls``: socat with OpenSSL on both ends, and
scp/sftp (AES-128-GCM) to a private sshd on a loopback port.

The sshd is the system's binary (Debian's openssh-server) with a configuration, host key,
user key and authorized_keys made in a temporary directory: nothing of the system's ssh
set-up is read or changed. Missing binaries skip the rows with how to install them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from filedock_bench.external_tools import ensure_sshd
from filedock_bench.measure import Sample, Skip
from filedock_bench.workspace import free_port, is_listening, remove, wait_for

SOCAT_BUFFER = 131072
"""socat's -b on both ends: of 16 KiB, 128 KiB and 1 MiB tried here, 128 KiB moved most (one TLS
record is 16 KiB; socat reads one record per SSL_read whatever -b says)."""

SSH_CIPHER = "aes128-gcm@openssh.com"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SocatTlsUpload:
    """``socat OPEN:FILE OPENSSL:...`` into ``socat OPENSSL-LISTEN:... OPEN:dest``, then an fsync."""

    def __init__(self, setup) -> None:
        from filedock_bench.measure import Figure

        self.setup = setup
        self.dest = setup.work / "socat-tls.bin"
        self.figure = Figure("1e-socat-tls", "socat OpenSSL -> socat OpenSSL, then fsync", nbytes=setup.size)

    def start(self) -> None:
        from filedock_bench.external_tools import require
        from tests.integration.harness import tls_files

        self.socat = require("socat")
        tls_dir = self.setup.work / "socat-tls"
        tls_dir.mkdir(exist_ok=True)
        key, self.cert = tls_files(tls_dir)
        self.pem = tls_dir / "socat.pem"
        self.pem.write_bytes(key.read_bytes() + self.cert.read_bytes())
        self.figure.notes.append(f"-b {SOCAT_BUFFER} both ends; OpenSSL's default suite (TLS 1.3, AES-256-GCM)")

    def run_once(self, index: int) -> Sample:
        port = free_port()
        listener = subprocess.Popen([self.socat, "-u", "-b", str(SOCAT_BUFFER),
                                     f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,cert={self.pem},verify=0",
                                     f"OPEN:{self.dest},creat,trunc,wronly"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: is_listening(port) or listener.poll() is not None, 15, what="socat listening")
            t0 = time.monotonic()
            sender = subprocess.run([self.socat, "-u", "-b", str(SOCAT_BUFFER), f"OPEN:{self.setup.source},rdonly",
                                     f"OPENSSL:127.0.0.1:{port},cafile={self.cert},commonname=localhost"],
                                    capture_output=True)
            listener.wait(600)
            _fsync(self.dest)
            seconds = time.monotonic() - t0
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
        if sender.returncode != 0 or self.dest.stat().st_size != self.setup.size:
            raise RuntimeError(f"socat TLS failed ({sender.returncode}): {sender.stderr[-300:]!r}")
        remove(self.dest)
        return Sample(seconds)

    def stop(self) -> None:
        remove(self.dest)


class PrivateSshd:
    """``sshd -D`` on a free loopback port with its own host key, user key and authorized_keys."""

    def __init__(self, work: Path) -> None:
        self.dir = work / "sshd"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        missing = ensure_sshd()
        if missing:
            raise Skip(missing)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.dir.mkdir(exist_ok=True)
        for name in ("host", "user"):
            if not (self.dir / name).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)],
                               check=True)
        shutil.copy(self.dir / "user.pub", self.dir / "authorized_keys")
        os.chmod(self.dir / "authorized_keys", 0o600)
        self.port = free_port()
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.dir / 'host'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}", f"PidFile {self.dir / 'sshd.pid'}",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            "PermitRootLogin prohibit-password", f"Ciphers {SSH_CIPHER}",
            "Subsystem sftp internal-sftp", ""]))
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory, as its package makes it
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "sshd.log", "ab"))
        wait_for(lambda: is_listening(self.port) or self.proc.poll() is not None, 15, what="sshd listening")
        if self.proc.poll() is not None:
            raise Skip(f"sshd exited {self.proc.returncode}: {(self.dir / 'sshd.log').read_text()[-300:]}")

    def ssh_options(self) -> list[str]:
        return ["-i", str(self.dir / "user"), "-c", SSH_CIPHER, "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}",
                "-o", "LogLevel=ERROR"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class ScpUpload:
    """``scp -c aes128-gcm@openssh.com FILE root@127.0.0.1:dest`` (or sftp ``put``), then an fsync."""

    def __init__(self, setup, tool: str = "scp") -> None:
        from filedock_bench.measure import Figure

        self.setup, self.tool = setup, tool
        self.dest = setup.work / f"{tool}.bin"
        self.sshd = PrivateSshd(setup.work)
        self.figure = Figure(f"1e-{tool}", f"{tool} -c {SSH_CIPHER} to a loopback sshd, then fsync",
                             nbytes=setup.size)

    def start(self) -> None:
        self.sshd.start()
        self.user = os.environ.get("USER") or "root"

    def run_once(self, index: int) -> Sample:
        target = f"{self.user}@127.0.0.1"
        opts = self.sshd.ssh_options()
        t0 = time.monotonic()
        if self.tool == "scp":
            done = subprocess.run(["scp", "-q", "-P", str(self.sshd.port), *opts, str(self.setup.source),
                                   f"{target}:{self.dest}"], capture_output=True, text=True)
        else:
            done = subprocess.run(["sftp", "-q", "-P", str(self.sshd.port), *opts, "-b", "-", target],
                                  input=f"put {self.setup.source} {self.dest}\n", capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{self.tool} exited {done.returncode}: {done.stderr[-300:]}")
        _fsync(self.dest)
        seconds = time.monotonic() - t0
        if self.dest.stat().st_size != self.setup.size:
            raise RuntimeError(f"{self.tool} wrote {self.dest.stat().st_size} bytes")
        remove(self.dest)
        return Sample(seconds)

    def stop(self) -> None:
        self.sshd.stop()
        remove(self.dest)


class SftpUpload(ScpUpload):
    """``sftp -c aes128-gcm@openssh.com`` with ``put FILE dest``, then an fsync."""

    def __init__(self, setup) -> None:
        super().__init__(setup, "sftp")
