"""Where benchmark data lives (benchmarks/work/, git-ignored), fresh random files,
loopback ports, and the filedock server process the cases talk to."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import blake3

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / "work"
PYTHON = sys.executable

if str(REPO) not in sys.path:  # for tests.integration.harness
    sys.path.insert(0, str(REPO))

from tests.integration.harness import ServerProcess  # noqa: E402

CHUNK = 16 << 20


class Workspace:
    """A directory under benchmarks/work/ for one case; removed, large files and all, on exit."""

    def __init__(self, name: str) -> None:
        self.path = WORK / name

    def __enter__(self) -> Path:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        return self.path

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def random_file(path: Path, size: int) -> Path:
    """A file of ``size`` fresh pseudo-random bytes (BLAKE3 output from a random key: ~5 GB/s,
    incompressible, never the same twice), flushed to disk so later fsyncs time only new writes."""
    stream = blake3.blake3(os.urandom(32))
    with open(path, "wb", buffering=0) as f:
        done = 0
        while done < size:
            n = min(CHUNK, size - done)
            f.write(stream.digest(length=n, seek=done))
            done += n
        os.fsync(f.fileno())
    return path


def random_tree(root: Path, count: int, size: int) -> list[Path]:
    """``count`` files of ``size`` random bytes each, named 00000.bin ... ."""
    root.mkdir(parents=True, exist_ok=True)
    stream = blake3.blake3(os.urandom(32))
    paths = []
    for i in range(count):
        p = root / f"{i:05d}.bin"
        p.write_bytes(stream.digest(length=size, seek=i * size))
        paths.append(p)
    os.sync()
    return paths


def remove(path: Path) -> None:
    """Delete a file or a tree if it is there."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for tools that cannot report theirs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, asked of the kernel (no connection made)."""
    needle = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and (fields[1] + " ").endswith(needle) and fields[3] == "0A":
                        return True
        except FileNotFoundError:
            pass
    return False


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.01, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; returns its value or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:g} s")
        time.sleep(interval)


def open_fds(pid: int) -> int:
    """How many file descriptors a process holds."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> str:
    """A process's soft/hard RLIMIT_NOFILE, as /proc/<pid>/limits shows it."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft}/{hard}"
    return "?"


def filedock_server(data_dir: Path, limits: list[str] | None = None) -> ServerProcess:
    """A real ``python -m filedock serve`` on loopback ports, started."""
    return ServerProcess(data_dir, limits=limits).start()


def log_size(server: ServerProcess) -> int:
    try:
        return server.log_path.stat().st_size
    except FileNotFoundError:
        return 0


def log_since(server: ServerProcess, offset: int) -> str:
    """The server's log written after ``offset`` bytes."""
    with open(server.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def delete_job(server: ServerProcess, job_id: str) -> None:
    """Delete a job and its files on the server (bench clean-up between runs)."""
    server.api.request("DELETE", f"/v1/jobs/{job_id}")
