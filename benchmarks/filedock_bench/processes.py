"""Child processes: helper servers that report a port and JSON lines, and timed commands
whose peak memory comes from ``wait4`` (exact, even for short-lived processes)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filedock_bench.workspace import PYTHON, wait_for

HERE = Path(__file__).resolve().parent


class HelperServer:
    """``python <script> ... --ready R``: started, its port read from R, JSON lines read from stdout."""

    def __init__(self, script: str, args: list[str], work: Path) -> None:
        self.ready = work / f"{Path(script).stem}-ready.json"
        self.cmd = [PYTHON, str(HERE / script), *args, "--ready", str(self.ready)]
        self.log = work / f"{Path(script).stem}.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._buf = b""

    def start(self, timeout: float = 30.0) -> int:
        self.ready.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=log)
        wait_for(lambda: self.ready.exists() or self.proc.poll() is not None, timeout, what="helper ready")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.cmd[1]} exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        self.port = json.loads(self.ready.read_text())["port"]
        return self.port

    def next_json(self, timeout: float) -> dict[str, Any]:
        """The next JSON line the server prints, or TimeoutError."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no report from {self.cmd[1]} within {timeout:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"{self.cmd[1]} exited: {self.log.read_text()[-2000:]}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()


@dataclass
class Finished:
    """A command that ran to its end."""

    seconds: float
    returncode: int
    stdout: str
    stderr: str
    max_rss_kib: int
    pid: int
    cpu_seconds: float = 0.0
    """The command's user + system CPU time (its threads and reaped children included)."""


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """A live process's user + system CPU time so far (all its threads), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of proc(5))


def run_timed(cmd: list[str], env: dict[str, str] | None = None, on_start: Any = None,
              timeout: float = 1800.0) -> Finished:
    """Run ``cmd`` to its end; time it from just before the fork to its exit.

    ``on_start(pid)`` is called once it runs (e.g. to sample its memory). Output goes
    to temporary files, not pipes, so a chatty child never blocks on us.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        if on_start is not None:
            on_start(proc.pid)
        _pid, status, usage = _wait4(proc, timeout)
        seconds = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Finished(seconds, proc.returncode, out.read().decode("utf-8", "replace"),
                        err.read().decode("utf-8", "replace"), usage.ru_maxrss, proc.pid,
                        usage.ru_utime + usage.ru_stime)


def _wait4(proc: subprocess.Popen, timeout: float):
    """Block until the child exits (a pidfd wakes us at once), then reap it with its rusage."""
    fd = os.pidfd_open(proc.pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            proc.kill()
    finally:
        os.close(fd)
    return os.wait4(proc.pid, 0)
