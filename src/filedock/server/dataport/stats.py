"""What the data port counts (for metrics) and shows (for status): requests report here."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class DataPortStats:
    """Counters for metrics; monotonically increasing except ``active``.

    ``in_flight`` is the status view: each upload or batch in progress shows itself
    (``show``) with a function describing it, and hides itself when it ends.
    """

    bytes_received: int = 0
    bytes_sent: int = 0
    uploads_started: int = 0
    uploads_completed: int = 0
    uploads_failed: Counter = field(default_factory=Counter)
    resumes: int = 0
    takeovers: int = 0
    downloads: int = 0
    active: int = 0
    refused: int = 0  # connections refused (or ended) for the connection limits
    durable_buckets: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)
    durable_counts: list[int] = field(default_factory=lambda: [0] * 10)
    durable_sum: float = 0.0
    durable_count: int = 0
    in_flight: dict[Any, Callable[[], dict[str, Any]]] = field(default_factory=dict, repr=False, compare=False)

    def observe_durable(self, seconds: float) -> None:
        """One upload's time from its last byte to durable, into a cumulative histogram."""
        self.durable_sum += seconds
        self.durable_count += 1
        for i, bound in enumerate(self.durable_buckets):
            if seconds <= bound:
                self.durable_counts[i] += 1

    def show(self, owner: Any, describe: Callable[[], dict[str, Any]]) -> None:
        """``owner`` is in progress; ``describe()`` says how far (no keys in full)."""
        self.in_flight[owner] = describe

    def hide(self, owner: Any) -> None:
        """``owner`` is no longer in progress."""
        self.in_flight.pop(owner, None)

    def status(self) -> list[dict[str, Any]]:
        """What is in progress now: one entry per upload, one per batch."""
        return [describe() for describe in list(self.in_flight.values())]
