"""Samples, figures and the interleaved runner: every figure is a median of runs
taken in turn with the figures it is compared with (A B C A B C ...), so that a
burst of load from other users of the machine hits all of them alike."""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

MB = 1_000_000
"""MB/s are decimal megabytes per second; sizes given on the command line are binary (1G = 2**30)."""

_SCALE = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``'128M'`` -> 134217728; ``'1.5G'``, ``'64K'`` and plain byte counts work too."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _SCALE.get(raw[-1:], 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 128M, 1G)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def human_size(n: int) -> str:
    """1073741824 -> '1 GiB'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{n} B"


def say(message: str) -> None:
    """Progress on stderr; stdout is kept for the final table."""
    print(message, file=sys.stderr, flush=True)


class Skip(Exception):
    """A figure cannot be measured here (a tool is missing, a command does not exist)."""


@dataclass
class Sample:
    """One timed run: ``seconds`` is the figure's time; ``extra`` holds side measurements."""

    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Figure:
    """One row of the results: a median over runs, with how to read it.

    ``nbytes`` per run gives MB/s; ``files`` per run gives files/s; ``value`` is for
    figures that are not rates (memory, start-up time).
    """

    key: str
    title: str
    nbytes: int | None = None
    files: int | None = None
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    value: float | None = None
    value_unit: str = ""
    skipped: str | None = None
    failed: str | None = None

    @property
    def seconds(self) -> list[float]:
        return [s.seconds for s in self.samples]

    @property
    def median_seconds(self) -> float | None:
        return statistics.median(self.seconds) if self.samples else None

    @property
    def mbps(self) -> float | None:
        if not self.samples or not self.nbytes:
            return None
        return self.nbytes / self.median_seconds / MB

    @property
    def files_per_second(self) -> float | None:
        if not self.samples or not self.files:
            return None
        return self.files / self.median_seconds

    def extras(self, name: str) -> list[Any]:
        """One side measurement across runs (runs that lack it are left out)."""
        return [s.extra[name] for s in self.samples if name in s.extra]

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "bytes_per_run": self.nbytes, "files_per_run": self.files,
                "seconds": self.seconds, "median_seconds": self.median_seconds, "mb_per_s": self.mbps,
                "files_per_s": self.files_per_second, "value": self.value, "value_unit": self.value_unit or None,
                "notes": self.notes, "skipped": self.skipped, "failed": self.failed,
                "runs": [s.extra for s in self.samples]}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class Variant(Protocol):
    """One contender in an interleaved comparison."""

    figure: Figure

    def start(self) -> None:
        """Prepare (servers, daemons); raise ``Skip`` if it cannot run here. Not timed."""

    def run_once(self, index: int) -> Sample:
        """One timed run, cleaning up after itself."""

    def stop(self) -> None:
        """Undo ``start``; called even when it failed."""


def run_interleaved(variants: list[Variant], runs: int, alternate: tuple[str, str] | None = None) -> list[Figure]:
    """Start all, then A B C ... ``runs`` times, then stop all. A variant that fails stops running.

    ``alternate``: the keys of two variants compared with each other run by run; they swap places in
    every second round (A B, B A, ...), so neither is always the one that runs after the other
    (with a fixed order, ``1a-auto`` right after ``1a`` was 0.89x of it in a full run on a fresh clone,
    and 1.00x by pairs when the order alternated: benchmarks/README.md)."""
    live: list[Variant] = []
    try:
        for v in variants:
            try:
                v.start()
                live.append(v)
            except Skip as exc:
                v.figure.skipped = str(exc)
                say(f"  skip {v.figure.key} {v.figure.title}: {exc}")
        for index in range(runs):
            order = list(live)
            if alternate and index % 2:
                keys = [v.figure.key for v in order]
                if all(k in keys for k in alternate):
                    i, j = keys.index(alternate[0]), keys.index(alternate[1])
                    order[i], order[j] = order[j], order[i]
            for v in order:
                if v in live:
                    _run_one(v, index, runs, live)
    finally:
        for v in variants:
            try:
                v.stop()
            except Exception as exc:  # a failed stop must not hide the figures
                say(f"  warning: stopping {v.figure.key} failed: {exc!r}")
    return [v.figure for v in variants]


def settle_disk() -> None:
    """Before each run (not timed): write out what earlier runs left dirty and let the filesystem finish
    freeing what they deleted (on a filesystem mounted with ``discard``, a deleted 1 GiB file is trimmed
    when the journal next commits), so one run's clean-up is not charged to the next run's fsyncs."""
    os.sync()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
"""Ticks per second of ``/proc/stat``."""


def cpu_times() -> list[int] | None:
    """The machine's CPU time so far, in ticks: user nice system idle iowait irq softirq steal."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def machine_share(before: list[int] | None, after: list[int] | None) -> dict[str, float]:
    """What the whole machine did between two ``cpu_times``: % of CPU time stolen by the host
    (other guests) and % waiting on I/O (a run with much of either was slowed from outside),
    % busy (user, system, interrupts: every core busy is 100) and those busy CPU-seconds. A run
    whose cores were all busy was bound by CPU: its CPU-seconds per byte say what it costs."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return {}
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    if total <= 0:
        return {}
    busy = delta[0] + delta[1] + delta[2] + delta[5] + delta[6]  # user nice system irq softirq
    return {"steal_pct": round(100 * delta[7] / total, 1), "iowait_pct": round(100 * delta[4] / total, 1),
            "busy_pct": round(100 * busy / total, 1), "cpu_seconds": round(busy / CLOCK_TICKS, 3)}


def _run_one(v: Variant, index: int, runs: int, live: list[Variant]) -> None:
    fig = v.figure
    settle_disk()
    started = time.monotonic()
    cpu_before = cpu_times()
    try:
        sample = v.run_once(index)
    except Skip as exc:
        fig.skipped = str(exc)
        live.remove(v)
        say(f"  skip {fig.key} {fig.title}: {exc}")
        return
    except Exception as exc:
        fig.failed = f"run {index + 1}: {exc!r}"
        live.remove(v)
        say(f"  FAILED {fig.key} {fig.title} (run {index + 1}): {exc!r}")
        traceback.print_exc(file=sys.stderr)
        return
    share = machine_share(cpu_before, cpu_times())
    sample.extra.update(share)
    fig.samples.append(sample)
    rate = ""
    if fig.nbytes:
        rate = f" = {fig.nbytes / sample.seconds / MB:8.1f} MB/s"
    elif fig.files:
        rate = f" = {fig.files / sample.seconds:8.1f} files/s"
    machine = ", ".join(f"{k.removesuffix('_pct')} {v:.0f}%" for k, v in share.items()
                        if k in ("steal_pct", "iowait_pct") and v >= 1)
    if "busy_pct" in share:
        machine = f"busy {share['busy_pct']:.0f}%" + (", " + machine if machine else "")
    say(f"  run {index + 1}/{runs} {fig.key:<12} {sample.seconds:8.3f} s{rate}"
        f"   ({time.monotonic() - started:.1f} s wall{', ' + machine if machine else ''})")
