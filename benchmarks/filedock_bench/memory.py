"""Resident memory of running processes, sampled from /proc/<pid>/status."""

from __future__ import annotations

import threading


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS since the process started) in KiB; {} once it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":")
                    out[name] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class RssSampler:
    """Samples VmRSS/VmHWM of several processes every ``interval`` seconds, in a thread.

    Keeps each pid's largest VmRSS and last VmHWM seen; pids can be added while running.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.pids: list[int] = []
        self.max_rss: dict[int, int] = {}
        self.hwm: dict[int, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add(self, pid: int) -> None:
        self.pids.append(pid)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        for pid in list(self.pids):
            st = status_kib(pid)
            if st:
                self.max_rss[pid] = max(self.max_rss.get(pid, 0), st.get("VmRSS", 0))
                self.hwm[pid] = max(self.hwm.get(pid, 0), st.get("VmHWM", 0))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
