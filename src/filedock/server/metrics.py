"""Prometheus text exposition of the data port's counters (``GET /metrics``).

The format is small and stable (text format 0.0.4), so a few lines here do the job
of a dependency.
"""

from __future__ import annotations

from filedock.server.dataport import DataPortStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _metric(lines: list[str], name: str, kind: str, helptext: str, samples: list[tuple[str, float]]) -> None:
    lines.append(f"# HELP {name} {helptext}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")


def render(stats: DataPortStats) -> bytes:
    """All filedock metrics as Prometheus text."""
    lines: list[str] = []
    _metric(lines, "filedock_received_bytes_total", "counter", "Body bytes received on the data port.",
            [("", stats.bytes_received)])
    _metric(lines, "filedock_sent_bytes_total", "counter", "Body bytes sent by downloads.",
            [("", stats.bytes_sent)])
    _metric(lines, "filedock_uploads_started_total", "counter", "Uploads accepted (OFFSET sent or 2007 header).",
            [("", stats.uploads_started)])
    _metric(lines, "filedock_uploads_completed_total", "counter", "Uploads made durable and recorded.",
            [("", stats.uploads_completed)])
    _metric(lines, "filedock_uploads_failed_total", "counter", "Uploads that ended without completing, by code.",
            [(f'{{code="{code}"}}', n) for code, n in sorted(stats.uploads_failed.items())])
    _metric(lines, "filedock_resumes_total", "counter", "Uploads that continued from a durable offset > 0.",
            [("", stats.resumes)])
    _metric(lines, "filedock_takeovers_total", "counter", "Connections taken over by a newer one.",
            [("", stats.takeovers)])
    _metric(lines, "filedock_downloads_total", "counter", "Downloads started.", [("", stats.downloads)])
    _metric(lines, "filedock_active_connections", "gauge", "Open data-port connections.",
            [("", stats.active)])
    _metric(lines, "filedock_connections_refused_total", "counter",
            "Data-port connections refused, or ended before their request, by the connection limits.",
            [("", stats.refused)])
    _histogram(lines, "filedock_durable_seconds", "Time from the last byte to durable (fsync, rename, record).",
               stats)
    return ("\n".join(lines) + "\n").encode()


def _histogram(lines: list[str], name: str, helptext: str, stats: DataPortStats) -> None:
    lines.append(f"# HELP {name} {helptext}")
    lines.append(f"# TYPE {name} histogram")
    for bound, count in zip(stats.durable_buckets, stats.durable_counts):
        lines.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {stats.durable_count}')
    lines.append(f"{name}_sum {stats.durable_sum:g}")
    lines.append(f"{name}_count {stats.durable_count}")
