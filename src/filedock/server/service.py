"""Service wiring: one data dir, one store, a data port and a control API, listening.

``FiledockServer`` is what ``filedock serve`` runs; tests and embedders can build
it too. Every listening address is a Twisted endpoint string, TLS included.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from filedock.config import Limits
from filedock.digest import hash_stream
from filedock.errors import ErrorCode, FiledockError, short_key
from filedock.server.authority import StoreAuthority
from filedock.server import proxied, tls_fast
from filedock.server.dataport import DataPortFactory
from filedock.server.events import EventDelivery
from filedock.server.registry import InProcessUploadRegistry, IUploadRegistry
from filedock.store.blobstore import open_blob_store
from filedock.store.metadata import DeferredStore, MetadataStore
from filedock.store.sqlite import SQLiteStore
from filedock.store.work_queue import WorkQueue

log = Logger(namespace="filedock.server")

DB_NAME = "filedock.sqlite3"


LOCK_NAME = "filedock.lock"


def lock_data_dir(data_dir: str | Path, shared: bool = False) -> int:
    """Take the data dir for this process (an exclusive ``flock``); returns the descriptor to keep open.

    One server per data dir on SQLite: two would race on the SQLite file's single writer
    (and sweep each other's partials). Servers whose metadata and upload registry are in
    PostgreSQL share a data dir of blobs (``shared``: a shared ``flock``, which any number
    of them hold at once): the database says who holds which file. Either lock keeps
    ``fsck --repair`` (exclusive) away while a server runs. Raises ``FiledockError(conflict)`` if another
    process holds it, ``FiledockError(internal-error)`` if the lock cannot be taken at
    all (a filesystem without locks); the lock goes with the process, however it
    ends (the descriptor is not inherited by children). The lock file is readable by
    anyone, so whichever user created it, the service user can lock it.
    """
    import fcntl

    path = Path(data_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = path / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FiledockError(ErrorCode.INTERNAL_ERROR, f"cannot open {lock}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o644)  # whatever the umask (serve sets 077): it holds nothing, and every user may lock it
    except OSError:
        pass  # someone else's lock file: it is readable, or the open above had failed
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FiledockError(ErrorCode.CONFLICT, f"another filedock process is using {path} "
                                                "(a server, or fsck --repair); stop it first") from None
    except OSError as exc:
        os.close(fd)
        raise FiledockError(ErrorCode.INTERNAL_ERROR, f"cannot lock {lock}: {exc.strerror or exc} (a filesystem "
                                                      "without file locks cannot hold a data dir)") from None
    return fd


def data_dir_in_use(data_dir: str | Path) -> bool:
    """Whether a server (or fsck --repair) holds the data dir now; the lock is not kept."""
    try:
        os.close(lock_data_dir(data_dir))
    except FiledockError as exc:
        if exc.code is ErrorCode.CONFLICT:
            return True
        raise
    return False


METADATA_ENV = "FILEDOCK_METADATA"
"""The environment variable ``--metadata`` falls back to."""


def check_metadata_url(url: str | None) -> str | None:
    """``url`` if it is a metadata URL filedock can open (``sqlite:///path`` or
    ``postgresql://user@host:port/db``; None or empty: the data dir's SQLite database),
    else ``FiledockError(bad-request)`` saying what one looks like."""
    if not url:
        return None
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///") or len(url) <= len("sqlite:///"):
            raise FiledockError(ErrorCode.BAD_REQUEST,
                                f"a SQLite metadata URL is sqlite:///absolute/path, not {url[:40]!r}")
        return url
    if url.startswith(("postgresql:", "postgres:")):
        from filedock.store.postgres import check_url

        return check_url(url)
    raise FiledockError(ErrorCode.BAD_REQUEST, f"--metadata is sqlite:///path or postgresql://user@host:port/db, "
                                               f"not {url[:40]!r}")


def shares_the_data_dir(metadata: str | None) -> bool:
    """Whether servers with this ``--metadata`` may share one data dir: metadata in PostgreSQL, and
    with it the upload registry (see ``upload_registry_for``)."""
    url = check_metadata_url(metadata)
    return url is not None and not url.startswith("sqlite:")


def upload_registry_for(metadata: str | None, reactor: Any) -> IUploadRegistry:
    """Who holds which file: with metadata in PostgreSQL the registry every server on that database
    shares (claims, takeover across servers); on SQLite this process's own."""
    if shares_the_data_dir(metadata):
        from filedock.server.pg_registry import PostgresUploadRegistry

        return PostgresUploadRegistry(check_metadata_url(metadata), reactor)
    return InProcessUploadRegistry()


def open_store(data_dir: str | Path, metadata: str | None = None) -> MetadataStore:
    """The metadata store, created and migrated if needed: the data dir's SQLite database, or the
    one ``metadata`` names (see ``check_metadata_url``). PostgreSQL's file keys are derived with
    the data dir's secret file (``filedock.secret``), which every server sharing it must hold."""
    url = check_metadata_url(metadata)
    path = Path(data_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if url is None:
        return SQLiteStore(path / DB_NAME)
    if url.startswith("sqlite:"):
        db_path = Path(url[len("sqlite://"):])
        db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return SQLiteStore(db_path)
    from filedock.store.postgres import PostgresStore

    return PostgresStore(url, secret_path=(path / DB_NAME).with_suffix(".secret"))


ADMIN_TOKEN_NAME = "admin-token"
"""The file in the data dir that keeps the first-run admin token (owner-only, 0600)."""


def first_run_token(data_dir: str | Path, metadata: str | None = None) -> tuple[str, Path, bool]:
    """The admin token ``serve --issue-admin-token`` hands out: (token, its file, newly made).

    The token is kept in ``<data>/admin-token`` (mode 0600) so that it survives restarts:
    a user who exported it once keeps working. A new one is made (and the one issued
    before it revoked) only when the file is missing or holds a token the store no longer
    accepts. The caller holds the data dir's lock.
    """
    path = Path(data_dir) / ADMIN_TOKEN_NAME
    store = open_store(data_dir, metadata)
    try:
        try:
            kept = path.read_text(encoding="ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            kept = ""
        if kept and store.check_token(kept):
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)  # a copy from an older version, or a careless restore
            return kept, path, False
        store.delete_tokens("serve")
        token = store.create_token("serve")
    finally:
        store.close()
    tmp = path.with_name(f".{ADMIN_TOKEN_NAME}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token, path, True


def owner_only_data_dir(data_dir: str | Path) -> None:
    """Make the data dir owner-only (0700), as filedock makes it: what older versions made 0755
    (with a world-readable database) is closed at the door. Nothing is changed in a directory
    someone else owns."""
    path = Path(data_dir)
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)
        log.info("data dir {path} made owner-only (0700)", path=str(path))


LISTEN_BACKLOG = 1024
"""The accept queue asked for on every TCP/TLS port (the kernel caps it at net.core.somaxconn).

Twisted's default is 50: a burst of 2007-dialect uploads (which never get a reply, so never
know) overflowed it and lost uploads silently."""


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """``description`` with ``backlog=N`` added if it is a ``tcp``, ``ssl`` or ``unix`` endpoint without one
    (also under a ``haproxy:`` prefix, whose listening endpoint is the one after it)."""
    if description.startswith(proxied.PREFIX):
        return proxied.PREFIX + with_backlog(proxied.inner_description(description), backlog)
    fields = re.split(r"(?<!\\):", description)
    if fields[0] not in ("tcp", "tcp6", "ssl", "unix") or any(f.startswith("backlog=") for f in fields[1:]):
        return description
    return f"{description}:backlog={backlog}"


@dataclass
class ServerOptions:
    """What ``filedock serve`` is told."""

    data_dir: str = "./filedock-data"
    api_listen: str = f"tcp:7480:interface=127.0.0.1:backlog={LISTEN_BACKLOG}"
    data_listen: str = f"tcp:7481:interface=127.0.0.1:backlog={LISTEN_BACKLOG}"
    public_host: str | None = None
    limits: Limits = field(default_factory=Limits)
    webhooks: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    blobs: str | None = None
    """Where file bytes go (``--blobs``): ``file:///dir`` or ``s3://bucket/prefix?endpoint=URL``; None: the data dir."""
    metadata: str | None = None
    """The metadata store's URL (``--metadata``; None: the data dir's SQLite database)."""
    public_data_port: int | None = None
    """The data port clients are told to use (``--public-data-port``; default: the one it listens on),
    as ``public_host`` for the host: behind a balancer, the balancer's."""
    umask: int | None = 0o077
    """The process umask the server sets at start (None: leave it): whatever else writes into the
    data dir (SQLite, a library) makes owner-only files too."""
    cors_origins: list[str] = field(default_factory=list)
    """Origins whose browser pages may upload to ``/files/`` (tus, the IETF draft); none by default."""


class FiledockServer:
    """The server: store, blobs, data port, control API and the partial sweeper."""

    def __init__(self, options: ServerOptions, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.options = options
        self.reactor = reactor
        self.limits = options.limits
        if options.umask is not None:
            os.umask(options.umask)
        self._lock = lock_data_dir(options.data_dir, shared=shares_the_data_dir(options.metadata))
        owner_only_data_dir(options.data_dir)
        self.work_queue = WorkQueue()  # the blob writers' disk threads; stopped after the reactor's own
        # before the metadata store starts its threads: a bad --blobs URL ends the process at once
        self.blobs = open_blob_store(options.blobs, options.data_dir, self.work_queue)
        reactor.addSystemEventTrigger("after", "shutdown", self.work_queue.stop)
        reactor.addSystemEventTrigger("after", "shutdown", self.blobs.close)
        self.sqlite = open_store(options.data_dir, options.metadata)
        self.store = DeferredStore(self.sqlite, reactor)
        self.events = EventDelivery(self.store, reactor, options.webhooks, options.commands)
        self.authority = StoreAuthority(self.store, self.limits, on_complete=self._file_complete, blobs=self.blobs)
        self.registry = upload_registry_for(options.metadata, reactor)
        self.dataport = DataPortFactory(self.authority, self.blobs, self.limits, reactor, registry=self.registry)
        self.dataport.noisy = False  # no "Starting factory <... object at 0x...>" lines in the log
        self.data_address: tuple[str, int, bool] | None = None
        self.api_address: tuple[str, int, bool] | None = None
        self._started_at = time.time()
        self._sweeper = task.LoopingCall(self.sweep_all)
        self._sweeper.clock = reactor

    def _file_complete(self, target: Any, job_complete: bool) -> None:
        if job_complete:
            log.info("job {job} complete", job=short_key(target.job_id))
            self.events.poke()

    def info(self) -> dict[str, Any]:
        """What clients learn from GET /v1/info about where to send bytes."""
        host, port, tls = self.data_address
        return {"data_port": {"host": self.options.public_host or host, "port": self.options.public_data_port or port,
                              "tls": tls}}

    def api_site(self):
        """The control API's hardened ``Site`` (bounded bodies, keys cut in the access log)."""
        from filedock.server.api import ControlAPI

        from filedock.server.http_upload import HttpUploads

        api = ControlAPI(_StoreTellingTheDataPort(self.store, self.dataport), self.blobs, self.limits,
                         self.dataport, self.info)
        api.http_uploads = HttpUploads(api, self.dataport, self.authority, tuple(self.options.cors_origins))
        site = api.site()
        site.noisy = False
        return site

    @defer.inlineCallbacks
    def record_unrecorded(self):
        """Record complete the files that were renamed into place but whose record then failed.

        A file is renamed into place only once it is fsync'd and checked, so such a file
        is a finished upload whose ``STORED`` never went out (a crash or a full disk
        between the rename and the record). A versioned client's next ``PUT`` would find
        it; a 2007 client never asks again, so at start (before anyone can connect) each
        one is hashed from disk and recorded complete. Returns how many.
        """
        found = 0
        for record in (yield self.store.unfinished_files()):
            size = yield self.dataport.in_thread(self.blobs.complete_size, record.job_id, record.blob_name)
            if size != record.size:
                continue  # none, or not whole: left to resumes and fsck
            claim = yield self.registry.try_acquire(record.key)
            if claim is None:
                continue  # another server (sharing the blobs) is finishing it now
            try:
                hasher = yield self.dataport.in_thread(_hash_complete, self.blobs, record.job_id, record.blob_name)
                yield self.store.record_complete(record.key, hasher.crc32, hasher.hexdigest())
                yield self.dataport.in_thread(self.blobs.discard, record.job_id, record.blob_name)  # a stale partial
            finally:
                self.registry.release(claim)
            found += 1
            log.info("recorded {key} of job {job} complete: it was in place but never recorded",
                     key=short_key(record.key), job=short_key(record.job_id))
        return found

    @defer.inlineCallbacks
    def start(self):
        """Listen on both ports; returns (api_url, data_host, data_port)."""
        if hasattr(self.registry, "start"):  # a shared registry: registered before any claim
            yield self.registry.start()
        yield self.record_unrecorded()
        header_timeout = self.limits.header_timeout
        data_ep = tls_fast.data_endpoint(self.reactor, with_backlog(self.options.data_listen), header_timeout)
        data_port = yield data_ep.listen(self.dataport)
        self.data_address = _address(data_port, self.options.data_listen)
        api_ep = proxied.server_endpoint(self.reactor, with_backlog(self.options.api_listen), header_timeout)
        api_port = yield api_ep.listen(self.api_site())
        self.api_address = _address(api_port, self.options.api_listen)
        self.events.start()
        self.reactor.addSystemEventTrigger("before", "shutdown", self.shut_down)
        self._sweeper.start(self.limits.sweep_interval, now=True).addErrback(
            lambda f: log.failure("sweeper stopped", f))
        host, port, tls = self.api_address
        scheme = "https" if tls else "http"
        return f"{scheme}://{_url_host(host)}:{port}/", self.data_address

    def shut_down(self) -> defer.Deferred:
        """On shutdown: drain the uploads, then let go of a shared registry (its claims, its threads).
        A "before" trigger, as only those are waited for."""
        done = self.drain()
        stop = getattr(self.registry, "stop", None)
        if stop is not None:
            done.addBoth(lambda _: stop()).addErrback(lambda f: log.failure("upload registry did not stop", f))
        return done

    def drain(self, timeout: float = 20.0) -> defer.Deferred:
        """On shutdown: end every upload so each partial is checkpointed and recorded first."""
        done = defer.DeferredList(self.dataport.end_uploads(), consumeErrors=True)
        return done.addTimeout(timeout, self.reactor).addErrback(
            lambda f: log.warn("shutdown: some uploads did not checkpoint in time"))

    @defer.inlineCallbacks
    def sweep_all(self):
        """What the sweeper does every ``sweep_interval``: ``sweep`` and ``sweep_parts``."""
        swept = yield self.sweep()
        parts = yield self.sweep_parts()
        return swept + parts

    @defer.inlineCallbacks
    def sweep_parts(self):
        """Delete tus concatenation parts untouched for ``limits.partial_ttl`` seconds (complete or not:
        no final upload came for them; not those in use), record and bytes; returns how many went."""
        cutoff = time.time() - self.limits.partial_ttl
        swept = 0
        for record in (yield self.store.stale_parts(cutoff)):
            registry = self.dataport.registry
            claim = yield registry.try_acquire(record.key)
            if claim is None:
                continue  # in use (being uploaded, or a final upload is made of it)
            try:
                yield self.store.delete_parts([record.key])  # the record first: it never claims bytes that are gone
                yield self.dataport.in_thread(self.blobs.delete_file, record.job_id, record.blob_name)
            finally:
                registry.release(claim)
            swept += 1
            log.info("swept abandoned concatenation part {key} of job {job} ({received} bytes)",
                     key=short_key(record.key), job=short_key(record.job_id), received=record.received)
        return swept

    @defer.inlineCallbacks
    def sweep(self):
        """Delete partials untouched for ``limits.partial_ttl`` seconds (not those in use), and
        staging files of batches that are gone; returns how many went."""
        cutoff = time.time() - self.limits.partial_ttl
        stale = yield self.store.stale_partials(cutoff)
        swept = 0
        for record in stale:
            # hold the file while we sweep it, so a new upload waits instead of racing us; the record
            # goes back to 0 before the bytes go, so it never claims bytes that are gone
            registry = self.dataport.registry
            claim = yield registry.try_acquire(record.key)
            if claim is None:
                continue  # in use
            try:
                yield self.store.reset_file(record.key)
                yield self.dataport.in_thread(self.blobs.discard, record.job_id, record.blob_name)
            finally:
                registry.release(claim)
            swept += 1
            log.info("swept stale partial {key} of job {job} ({received} bytes)",
                     key=short_key(record.key), job=short_key(record.job_id), received=record.received)
        # a batch's staging files live as long as its connection: any others were left by a crash
        # (anything from before this process started is a leftover at once)
        active = set(self.dataport.batch_tags)
        if not isinstance(self.dataport.registry, InProcessUploadRegistry):
            # a shared registry: other servers' batches stage here too, and only they know theirs: only old files go
            older_than = time.time() - self.SHARED_STAGING_GRACE
        else:
            older_than = max(self._started_at, time.time() - self.STAGING_GRACE)
        staged = yield self.dataport.in_thread(self.blobs.sweep_staging, active, older_than)
        if staged:
            log.info("swept {count} staging files of batches that did not finish", count=staged)
        return swept + staged

    STAGING_GRACE = 60.0
    """Seconds a staging file is left alone even if its batch is unknown (one may be starting)."""

    SHARED_STAGING_GRACE = 6 * 3600.0
    """In a data dir several servers share: seconds since its last write before a staging file of a
    batch this server does not know is taken for a crash's leftover (another server's batch may be
    writing other items meanwhile)."""


def _hash_complete(blobs, job_id: str, key: str):
    with blobs.open_complete(job_id, key) as f:
        return hash_stream(f)


class _StoreTellingTheDataPort:
    """The control API's store, which also tells the data port when a job is deleted or a session
    closed, so their connections end now (``gone``, ``session-closed``) instead of at their end."""

    def __init__(self, store: DeferredStore, dataport: DataPortFactory) -> None:
        self._store, self._dataport = store, dataport

    def __getattr__(self, method: str) -> Any:
        return getattr(self._store, method)

    def delete_job(self, job_id: str) -> defer.Deferred:
        # First stop the job's connections but keep their partials: the delete may still fail (a
        # full disk), and records must never outlive their bytes. Only once it committed are their
        # files forgotten (and any connection authorized while it ran ended).
        self._dataport.interrupt_job(job_id)

        def deleted(result: Any) -> Any:
            self._dataport.end_job(job_id)
            return result

        return self._store.delete_job(job_id).addCallback(deleted)

    def close_session(self, key: str) -> defer.Deferred:
        def closed(result: Any) -> Any:
            self._dataport.end_session(key)
            return result

        return self._store.close_session(key).addCallback(closed)


def _address(port: Any, description: str) -> tuple[str, int, bool]:
    addr = port.getHost()
    tls = proxied.inner_description(description).split(":", 1)[0] in ("ssl", "tls")
    return addr.host, addr.port, tls


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def write_ready_file(path: str, payload: dict[str, Any]) -> None:
    """Atomically write the JSON a supervisor or test waits for."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:  # it may hold a token
        json.dump(payload, f)
    os.replace(tmp, path)
