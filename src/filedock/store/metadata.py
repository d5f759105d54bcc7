"""The metadata store's interface: what the server asks of SQL, and nothing else.

``SQLiteStore`` implements it; a PostgreSQL backend (several servers, one store)
implements the same methods. Methods are synchronous and may block: the server
calls them through ``DeferredStore``, which runs them off the reactor thread.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from filedock.store.model import Event, FileRecord, Job, Session

T = TypeVar("T")


class MetadataStore(Protocol):
    """Jobs, files, sessions, tokens and the event outbox."""

    # tokens
    def create_token(self, label: str) -> str: ...
    def check_token(self, token: str) -> bool: ...
    def delete_tokens(self, label: str) -> int: ...

    # jobs
    def create_job(self, name: str, metadata: dict[str, Any]) -> Job: ...
    def list_jobs(self) -> list[Job]: ...
    def find_job(self, id_or_name: str) -> Job | None: ...
    def update_job(self, job_id: str, name: str | None, metadata: dict[str, Any] | None) -> Job: ...
    def delete_job(self, job_id: str) -> list[FileRecord]: ...

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
    def stale_partials(self, older_than: float) -> list[FileRecord]: ...

    # sessions
    def open_session(self, job_id: str, ttl: float) -> Session: ...
    def get_session(self, key: str) -> Session | None: ...
    def close_session(self, key: str) -> Session | None: ...
    def session_and_file(self, session_key: str, file_key: str) -> tuple[Session | None, FileRecord | None]: ...

    # outbox
    def pending_events(self, limit: int) -> list[Event]: ...
    def mark_event(self, event_id: str, delivered: bool, delivered_to: list[str] | None = None) -> None: ...

    def close(self) -> None: ...


class DeferredStore:
    """Any ``MetadataStore`` method, run on one dedicated thread, as a Deferred.

    One thread keeps SQLite's single writer simple and the order of writes the
    order of calls; the reactor thread never waits on the database.
    """

    def __init__(self, store: MetadataStore, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.store = store
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="filedock-store")
        self._pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)

    def call(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:
        """``store.<method>(*args, **kwargs)`` on the store thread."""
        fn: Callable[..., Any] = getattr(self.store, method)
        return threads.deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)

    def __getattr__(self, method: str) -> Callable[..., defer.Deferred]:
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self.call(method, *args, **kwargs)
