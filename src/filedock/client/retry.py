"""The one place that decides whether a failed transfer is tried again, and when.

Both data-port clients (blocking and Twisted) and both control-API clients ask
``RetryPolicy.retryable(error)``; no other code compares error codes to decide a
retry. ``RetryBudget`` counts failures in a row across the connections of one
transfer and answers each failure with an action: ``Sleep`` (then reconnect) or
``GiveUp``. No I/O here: the clients do the sleeping.
"""

from __future__ import annotations

import random

from filedock.errors import (ErrorCode, FiledockError, LocalFileError, LocalProtocolError, RefusedByServer,
                             RemoteProtocolError, TransportFailure)
from filedock.record import record

MAX_BACKOFF = 30.0
"""Longest wait between two attempts, in seconds."""

REPLY_PATIENCE = 300.0
"""Least time to wait for OFFSET, STORED or DATA: the server may be re-hashing a
partial or fsyncing, and the protocol has no keepalive to say so."""

RETRYABLE_REFUSALS = frozenset({
    ErrorCode.TAKEN_OVER, ErrorCode.IDLE_TIMEOUT, ErrorCode.INTERNAL_ERROR, ErrorCode.TOO_MANY_CONNECTIONS,
    ErrorCode.STORE_UNAVAILABLE,
})
"""Server refusals a new connection may cure: another connection held the file, the server
timed ours out or had too many, or it failed inside (a restart may cure it), or its metadata
database was unreachable for a while. Every other
refusal is final."""

RETRY_STATUSES = frozenset({500, 502, 503, 504})
"""Control-API HTTP statuses a later attempt may cure (``507 no-space`` is not one: it needs a person)."""


@record
class RetryPolicy:
    """How a client rides through drops and restarts: ``attempts`` failures in a row before it gives
    up, waiting a jittered exponential backoff (``backoff`` seconds, doubling, at most ``MAX_BACKOFF``)
    between them. The data port and the control API use the same numbers."""

    attempts: int = 5
    backoff: float = 0.5

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (from 1)."""
        return min(MAX_BACKOFF, self.backoff * 2 ** (failures - 1)) * random.uniform(0.5, 1.5)

    @staticmethod
    def retryable_status(status: int) -> bool:
        """Whether a control-API answer with this HTTP status is worth another attempt (a refused,
        reset or timed-out request always is)."""
        return status in RETRY_STATUSES

    @staticmethod
    def retryable(error: BaseException) -> bool:
        """Whether a new connection may cure ``error``.

        Transport failures (refused, reset, stalled, unreachable) are; a server refusal
        is if its code is in ``RETRYABLE_REFUSALS``; a local file error, a protocol
        error on either side, a changed local file and anything else are final.
        """
        if isinstance(error, TransportFailure):
            return True
        if isinstance(error, (LocalFileError, RemoteProtocolError, LocalProtocolError)):
            return False
        if isinstance(error, RefusedByServer):
            return error.code in RETRYABLE_REFUSALS
        return False


@record
class Sleep:
    """Action: wait ``seconds``, then open a new connection."""

    seconds: float


@record
class GiveUp:
    """Action: the transfer fails with ``error``."""

    error: FiledockError


class RetryBudget:
    """Failures in a row of one transfer, across its connections.

    ``failed(error, progressed)`` -> ``Sleep`` or ``GiveUp``. ``progressed``: the
    connection that failed left the transfer further along than any before (a higher
    durable offset, bytes received); that resets the count, so a long transfer
    survives any number of drops as long as each one moves it on.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0

    def failed(self, error: FiledockError, progressed: bool = False) -> Sleep | GiveUp:
        if not RetryPolicy.retryable(error):
            return GiveUp(error)
        self.failures = 1 if progressed else self.failures + 1
        if self.failures >= max(1, self.policy.attempts):
            return GiveUp(_gave_up(error, self.failures))
        return Sleep(self.policy.delay(self.failures))


def _gave_up(error: FiledockError, n: int) -> FiledockError:
    message = f"{error.message} (gave up after {n} attempt{'s' if n > 1 else ''} in a row)"
    if isinstance(error, TransportFailure):
        return TransportFailure(message, error.code)
    if isinstance(error, RefusedByServer):
        return RefusedByServer(error.code, message)
    return FiledockError(error.code, message)
