"""rsync (daemon mode, --fsync) and socat, the non-Python yardsticks.

``ensure_tools`` looks for them once per benchmark run and, if one is missing,
tries ``apt-get install -y rsync socat`` once; whatever is still missing is
skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from filedock_bench.measure import Skip, say
from filedock_bench.workspace import free_port, is_listening, wait_for

TOOLS = ("rsync", "socat")
_checked: dict[str, str | None] = {}


def ensure_tools() -> dict[str, str | None]:
    """{tool: None if usable, else why not}; installs at most once per process."""
    if _checked:
        return _checked
    missing = [t for t in TOOLS if shutil.which(t) is None]
    note = ""
    if missing and shutil.which("apt-get"):
        say(f"  {', '.join(missing)} missing: trying apt-get install -y {' '.join(TOOLS)} (once)")
        proc = subprocess.run(["apt-get", "install", "-y", *TOOLS], capture_output=True, text=True)
        note = f"apt-get install exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-200:]}"
    elif missing:
        note = "no apt-get on this machine"
    for tool in TOOLS:
        _checked[tool] = None if shutil.which(tool) else f"{tool} not installed ({note})"
    return _checked


def ensure_sshd() -> str | None:
    """None if sshd and scp are here (openssh-server installed once with apt-get if missing), else why not.
    Case 1 (scp, sftp) and case 7 (rsync over ssh, scp) both start a private sshd."""
    def present() -> bool:
        return bool((shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")) and shutil.which("scp"))

    if present():
        return None
    if shutil.which("apt-get"):
        say("  sshd missing: trying apt-get install -y openssh-server (once)")
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], capture_output=True,
                       env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
    if present():
        return None
    return "sshd/scp not installed (apt-get install openssh-server openssh-client)"


def require(tool: str) -> str:
    reason = ensure_tools()[tool]
    if reason:
        raise Skip(reason)
    return shutil.which(tool)


class RsyncDaemon:
    """``rsync --daemon`` on 127.0.0.1 with one writable module ``bench`` at ``root``."""

    def __init__(self, work: Path, root: Path) -> None:
        self.work, self.root = work, root
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        rsync = require("rsync")
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.work / "rsyncd.conf"
        conf.write_text(
            f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\n"
            f"pid file = {self.work / 'rsyncd.pid'}\nlock file = {self.work / 'rsyncd.lock'}\n"
            f"log file = {self.work / 'rsyncd.log'}\n\n"
            f"[bench]\npath = {self.root}\nread only = no\n")
        self.port = free_port()
        self.proc = subprocess.Popen([rsync, "--daemon", "--no-detach", f"--config={conf}",
                                      "--address=127.0.0.1", f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: is_listening(self.port) or self.proc.poll() is not None, 15, what="rsyncd listening")
        if self.proc.poll() is not None:
            raise Skip(f"rsync --daemon exited with {self.proc.returncode}")

    def url(self, path: str = "") -> str:
        return f"rsync://127.0.0.1:{self.port}/bench/{path}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def rsync_command(source: str, dest_url: str, recursive: bool = False) -> list[str]:
    """The client command: ``--fsync`` is passed on to the daemon's receiver, which fsyncs each file."""
    return [shutil.which("rsync"), "--fsync", *(["-r"] if recursive else []), source, dest_url]


def socat_listener(dest: Path) -> tuple[subprocess.Popen, int]:
    """``socat -u -b 1048576 TCP-LISTEN:P OPEN:dest``, listening when this returns."""
    socat = require("socat")
    port = free_port()
    proc = subprocess.Popen([socat, "-u", "-b", "1048576", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
                             f"OPEN:{dest},creat,trunc,wronly"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: is_listening(port) or proc.poll() is not None, 15, what="socat listening")
    if proc.poll() is not None:
        raise RuntimeError(f"socat listener exited with {proc.returncode}")
    return proc, port


def socat_sender(source: Path, port: int) -> list[str]:
    """``socat -u FILE TCP``: socat's default 8 KiB buffer on this side, as given in the brief."""
    return [shutil.which("socat"), "-u", f"OPEN:{source},rdonly", f"TCP:127.0.0.1:{port}"]
