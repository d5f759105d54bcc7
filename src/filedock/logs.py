"""Logging set-up for the server: human-readable text or JSON lines, via twisted.logger."""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, jsonFileLogObserver,
    textFileLogObserver,
)


def start_logging(fmt: str = "text", level: LogLevel = LogLevel.info) -> None:
    """Send log events to stdout as text (default) or JSON lines (``fmt="json"``)."""
    observer = jsonFileLogObserver(sys.stdout) if fmt == "json" else textFileLogObserver(sys.stdout)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [predicate])],
                                     redirectStandardIO=False)
