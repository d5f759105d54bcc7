"""The metadata store's interface: what the server asks of SQL, and nothing else.

``SQLiteStore`` implements it; ``PostgresStore`` (several servers, one store)
implements the same methods. Methods are synchronous and may block: the server
calls them through ``DeferredStore``, which runs them off the reactor thread.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Protocol, TypeVar

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from filedock.store.model import Event, FileRecord, Job, Session, TokenGrant

T = TypeVar("T")


class MetadataStore(Protocol):
    """Jobs, files, sessions, tokens and the event outbox."""

    # tokens
    def create_token(self, label: str, scope: str = "admin", job_id: str | None = None) -> str: ...
    def check_token(self, token: str) -> TokenGrant | None: ...
    def list_tokens(self) -> list[TokenGrant]: ...
    def revoke_token(self, token_id: str) -> bool: ...
    def delete_tokens(self, label: str) -> int: ...

    # jobs
    def create_job(self, name: str, metadata: dict[str, Any]) -> Job: ...
    def list_jobs(self) -> list[Job]: ...
    def find_job(self, id_or_name: str) -> Job | None: ...
    def update_job(self, job_id: str, name: str | None, metadata: dict[str, Any] | None) -> Job: ...
    def delete_job(self, job_id: str) -> list[FileRecord]: ...

    # summaries: what a dashboard polls, at a cost that grows with the page, not the store
    def change_count(self) -> int: ...
    def job_summaries(self, limit: int, offset: int = 0) -> list[tuple[Job, int, int, int, int]]: ...
    def job_counts(self, job_id: str) -> tuple[int, int, int, int]: ...
    def count_jobs(self) -> int: ...
    def files_page(self, job_id: str, limit: int, offset: int = 0) -> list[FileRecord]: ...

    # files
    def add_file(self, job_id: str, name: str, size: int, quota: int | None) -> FileRecord: ...
    def add_files(self, job_id: str, entries: list[tuple[str, int]], quota: int | None) -> list[FileRecord]: ...
    def list_files(self, job_id: str) -> list[FileRecord]: ...
    def get_file(self, key: str) -> FileRecord | None: ...
    def record_progress(self, key: str, received: int, crc32: int, part_stamp: str | None) -> None: ...
    def record_complete(self, key: str, crc32: int, digest: str) -> bool: ...
    def record_complete_many(self, items: list[tuple[str, int, str]]) -> list[str]: ...
    def files_by_keys(self, keys: list[str]) -> list[FileRecord]: ...
    def reset_file(self, key: str, force: bool = False) -> None: ...
    def all_files(self) -> list[FileRecord]: ...
    def unfinished_files(self) -> list[FileRecord]: ...
    def stale_partials(self, older_than: float) -> list[FileRecord]: ...

    # sessions
    def open_session(self, job_id: str, ttl: float, scope: str = "admin") -> Session: ...
    def get_session(self, key: str) -> Session | None: ...
    def close_session(self, key: str) -> Session | None: ...
    def session_and_file(self, session_key: str, file_key: str) -> tuple[Session | None, FileRecord | None]: ...

    # outbox
    def pending_events(self, limit: int) -> list[Event]: ...
    def mark_event(self, event_id: str, delivered: bool, delivered_to: list[str] | None = None) -> None: ...

    def close(self) -> None: ...


class DeferredStore:
    """Any ``MetadataStore`` method, run on a store thread, as a Deferred.

    SQLite runs on one thread: that keeps its single writer simple and the order of
    writes the order of calls. A store with a ``threads`` attribute above 1 (PostgreSQL:
    each thread has its own connection) runs on that many threads, and a call goes to
    the thread its first argument picks (a hash of it; calls without one go to the
    first thread). So calls about one file (its key first: ``record_progress`` then
    ``record_complete``), one job or one session still run one after the other, in the
    order they were made, each on one connection; calls about different things run side
    by side. No caller relies on the order of two calls in flight at once about
    different things: a caller that needs one waits for the first call's Deferred (a file
    key is known only once ``add_files`` has returned, an event is marked only after
    ``pending_events`` has handed it out). The reactor thread never waits on the database.
    """

    def __init__(self, store: MetadataStore, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.store = store
        self._reactor = reactor
        count = max(1, int(getattr(store, "threads", 1)))
        self._pools = [ThreadPool(minthreads=1, maxthreads=1, name=f"filedock-store-{i}") for i in range(count)]
        for pool in self._pools:
            pool.start()
            reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    def _pool_for(self, args: tuple) -> ThreadPool:
        if len(self._pools) == 1 or not args or not isinstance(args[0], str):
            return self._pools[0]
        return self._pools[zlib.crc32(args[0].encode("utf-8", "surrogatepass")) % len(self._pools)]

    def call(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:
        """``store.<method>(*args, **kwargs)`` on the store thread its first argument picks."""
        fn: Callable[..., Any] = getattr(self.store, method)
        return threads.deferToThreadPool(self._reactor, self._pool_for(args), fn, *args, **kwargs)

    def __getattr__(self, method: str) -> Callable[..., defer.Deferred]:
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self.call(method, *args, **kwargs)
