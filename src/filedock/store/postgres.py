"""All of filedock's SQL for metadata in PostgreSQL: several servers, one store.

``PostgresStore`` implements ``MetadataStore`` with the semantics of ``SQLiteStore``
(read that first): file keys derived from ids with the secret kept outside the
database, session and file keys stored only as hashes, scoped tokens, per-job counts
kept by triggers, and the event outbox written in the transaction that completes a job.

What several servers sharing one database add:

- Migrations are numbered and applied at open under ``pg_advisory_xact_lock``, so
  servers starting at once apply each migration once; the others wait, then see it.
- A job becomes complete exactly once: ``record_complete`` locks the job's row before it
  counts the files left, so of two servers completing a job's last two files the
  second one waits, then sees the first one's file complete (each statement of a READ
  COMMITTED transaction reads what is committed when it starts) and makes the event.
  Without that lock each would count the other's file as unfinished and neither would.
- The outbox is delivered by one server at a time: ``pending_events`` claims the rows
  it returns with a lease (``FOR UPDATE SKIP LOCKED``, then ``claimed_by``/``lease_until``),
  renews the leases it holds at every pass and never returns an event another live
  server holds; a dead server's claims expire after ``EVENT_LEASE`` seconds.
- A dropped connection is given up and made again at the next call; a database that
  cannot be reached is the stable error ``store-unavailable`` (HTTP 503), never a traceback.

Each thread has its own connection: ``DeferredStore`` may run a few threads (``threads``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import psycopg
from psycopg import errors as pg_errors

from filedock.errors import ErrorCode, FiledockError
from filedock.digest import BLOCK_SIZE
from filedock.store.model import RANGED_STAMP
from filedock.store.model import (
    FILE_COMPLETE, FILE_PARTIAL, FILE_PENDING, JOB_COMPLETE, JOB_OPEN, PART_MARK, REPLACEMENT_MARK, SCOPE_ADMIN,
    SCOPES, Event, FileRecord, Job, Session, TokenGrant, replacement_name,
)
from filedock.store.sqlite import (
    _FILE_COLS, _JOB_COLS, _SESSION_COLS, _TOKEN_COLS, TOKEN_ID_LENGTH, hash_key, hash_token, load_secret, new_key,
)

T = TypeVar("T")

MIGRATIONS: list[str] = [
    # 1: the schema SQLite reached at its migration 5, in PostgreSQL's types (times are seconds since
    # the epoch as in SQLite; jobs.seq orders jobs created in the same instant, as SQLite's rowid does),
    # plus the outbox's claims (claimed_by, lease_until) that let one server at a time deliver an event
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        seq BIGINT GENERATED ALWAYS AS IDENTITY,
        name TEXT NOT NULL UNIQUE,
        metadata TEXT NOT NULL DEFAULT '{}',
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL
    );
    CREATE INDEX jobs_created ON jobs(created, seq);
    CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        label TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        scope TEXT NOT NULL DEFAULT 'admin',
        job_id TEXT REFERENCES jobs(id) ON DELETE CASCADE
    );
    CREATE TABLE sessions (
        key_hash TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        created DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION NOT NULL,
        closed DOUBLE PRECISION,
        scope TEXT NOT NULL DEFAULT 'admin'
    );
    CREATE INDEX sessions_job ON sessions(job_id);
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        size BIGINT NOT NULL,
        received BIGINT NOT NULL DEFAULT 0,
        state TEXT NOT NULL,
        crc32 BIGINT NOT NULL DEFAULT 0,
        digest TEXT,
        uploaded_at DOUBLE PRECISION,
        updated DOUBLE PRECISION NOT NULL,
        part_stamp TEXT,
        key_hash TEXT UNIQUE,
        UNIQUE (job_id, name)
    );
    CREATE INDEX files_state ON files(state, updated);
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        delivered DOUBLE PRECISION,
        delivered_to TEXT NOT NULL DEFAULT '[]',
        claimed_by TEXT,
        lease_until DOUBLE PRECISION
    );
    CREATE INDEX events_pending ON events(created) WHERE delivered IS NULL;
    CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE job_counts (
        job_id TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
        files BIGINT NOT NULL DEFAULT 0,
        complete BIGINT NOT NULL DEFAULT 0,
        bytes_total BIGINT NOT NULL DEFAULT 0,
        bytes_received BIGINT NOT NULL DEFAULT 0
    );
    CREATE FUNCTION job_counts_new_job() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_counts (job_id) VALUES (NEW.id);
        RETURN NULL;
    END $$;
    CREATE TRIGGER job_counts_new_job AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION job_counts_new_job();
    CREATE FUNCTION job_counts_file() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            UPDATE job_counts SET files = files - 1, complete = complete - (OLD.state = 'complete')::int,
                bytes_total = bytes_total - OLD.size, bytes_received = bytes_received - OLD.received
            WHERE job_id = OLD.job_id;
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            UPDATE job_counts SET files = files + 1, complete = complete + (NEW.state = 'complete')::int,
                bytes_total = bytes_total + NEW.size, bytes_received = bytes_received + NEW.received
            WHERE job_id = NEW.job_id;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER job_counts_file_added AFTER INSERT OR DELETE ON files
        FOR EACH ROW EXECUTE FUNCTION job_counts_file();
    CREATE TRIGGER job_counts_file_changed AFTER UPDATE OF job_id, state, size, received ON files
        FOR EACH ROW EXECUTE FUNCTION job_counts_file()
    """,
    # 2: completing one file in one round trip (record_complete): each round trip to the database is a
    # wake-up of another process, which costs most on a loaded machine; same steps as the Python of
    # record_complete_many: the job's row locked first, the file, a new version in its old one's place,
    # and the job complete (with its event) only if no visible file is left unfinished
    """
    CREATE FUNCTION filedock_complete_file(p_key_hash TEXT, p_crc32 BIGINT, p_digest TEXT,
                                           p_now DOUBLE PRECISION, p_event_id TEXT)
    RETURNS TABLE (job_id TEXT, became_complete BOOLEAN) LANGUAGE plpgsql AS $$
    DECLARE
        v_job TEXT;
        v_file TEXT;
        v_name TEXT;
        v_parts TEXT[];
    BEGIN
        SELECT j.id INTO v_job FROM jobs AS j
            WHERE j.id = (SELECT f.job_id FROM files AS f WHERE f.key_hash = p_key_hash) FOR UPDATE;
        IF v_job IS NULL THEN
            RETURN;
        END IF;
        UPDATE files AS f SET state = 'complete', received = f.size, crc32 = p_crc32, digest = p_digest,
            uploaded_at = p_now, updated = p_now, part_stamp = NULL
            WHERE f.key_hash = p_key_hash RETURNING f.id, f.name INTO v_file, v_name;
        IF v_file IS NULL THEN
            RETURN;
        END IF;
        IF substr(v_name, 1, 1) = chr(1) THEN
            v_parts := string_to_array(v_name, chr(1));
            DELETE FROM files AS f WHERE f.id = v_parts[2];
            UPDATE files AS f SET name = array_to_string(v_parts[3:], chr(1)) WHERE f.id = v_file;
        END IF;
        UPDATE jobs AS j SET state = 'complete', updated = p_now
            WHERE j.id = v_job AND j.state != 'complete' AND NOT EXISTS
                (SELECT 1 FROM files AS f WHERE f.job_id = v_job AND f.state != 'complete'
                 AND substr(f.name, 1, 1) != chr(1));
        IF FOUND THEN
            INSERT INTO events (id, job_id, kind, payload, created)
            SELECT p_event_id, v_job, 'job.complete', json_build_object(
                'id', p_event_id, 'type', 'job.complete', 'job', json_build_object('id', v_job, 'name', j.name),
                'files', (SELECT COALESCE(json_agg(json_build_object(
                              'name', f.name, 'id', f.id, 'size', f.size,
                              'crc32', lpad(to_hex(f.crc32), 8, '0'), 'digest', f.digest)
                              ORDER BY f.name COLLATE "C"), '[]'::json)
                          FROM files AS f WHERE f.job_id = v_job),
                'time', p_now)::text, p_now
            FROM jobs AS j WHERE j.id = v_job;
            RETURN QUERY SELECT v_job, TRUE;
        ELSE
            RETURN QUERY SELECT v_job, FALSE;
        END IF;
    END $$
    """,
    # 3: ranged uploads (see sqlite.py's migration 6)
    """
    CREATE TABLE range_blocks (
        file_id TEXT NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        block BIGINT NOT NULL,
        hash TEXT NOT NULL,
        crc32 BIGINT NOT NULL,
        PRIMARY KEY (file_id, block)
    )
    """,
    # 4: parts of a tus concatenation (names starting with PART_MARK, chr(2); SQLite's migration 7) are
    # hidden file records: the job's counts leave them out (a final and its parts are never counted twice),
    # completing one never completes its job, and a job's completion event never lists one. A file whose
    # length is deferred (creation-defer-length) has size 0 until a PATCH tells it; a final upload keeps the
    # Upload-Concat it was made with, to report it.
    """
    ALTER TABLE files ADD COLUMN length_deferred BOOLEAN NOT NULL DEFAULT FALSE,
        ADD COLUMN upload_concat TEXT;
    CREATE OR REPLACE FUNCTION job_counts_file() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('DELETE', 'UPDATE') AND substr(OLD.name, 1, 1) != chr(2) THEN
            UPDATE job_counts SET files = files - 1, complete = complete - (OLD.state = 'complete')::int,
                bytes_total = bytes_total - OLD.size, bytes_received = bytes_received - OLD.received
            WHERE job_id = OLD.job_id;
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') AND substr(NEW.name, 1, 1) != chr(2) THEN
            UPDATE job_counts SET files = files + 1, complete = complete + (NEW.state = 'complete')::int,
                bytes_total = bytes_total + NEW.size, bytes_received = bytes_received + NEW.received
            WHERE job_id = NEW.job_id;
        END IF;
        RETURN NULL;
    END $$;
    CREATE OR REPLACE FUNCTION filedock_complete_file(p_key_hash TEXT, p_crc32 BIGINT, p_digest TEXT,
                                           p_now DOUBLE PRECISION, p_event_id TEXT)
    RETURNS TABLE (job_id TEXT, became_complete BOOLEAN) LANGUAGE plpgsql AS $$
    DECLARE
        v_job TEXT;
        v_file TEXT;
        v_name TEXT;
        v_parts TEXT[];
    BEGIN
        SELECT j.id INTO v_job FROM jobs AS j
            WHERE j.id = (SELECT f.job_id FROM files AS f WHERE f.key_hash = p_key_hash) FOR UPDATE;
        IF v_job IS NULL THEN
            RETURN;
        END IF;
        UPDATE files AS f SET state = 'complete', received = f.size, crc32 = p_crc32, digest = p_digest,
            uploaded_at = p_now, updated = p_now, part_stamp = NULL
            WHERE f.key_hash = p_key_hash RETURNING f.id, f.name INTO v_file, v_name;
        IF v_file IS NULL THEN
            RETURN;
        END IF;
        IF substr(v_name, 1, 1) = chr(2) THEN  -- a concatenation part never completes its job
            RETURN QUERY SELECT v_job, FALSE;
            RETURN;
        END IF;
        IF substr(v_name, 1, 1) = chr(1) THEN
            v_parts := string_to_array(v_name, chr(1));
            DELETE FROM files AS f WHERE f.id = v_parts[2];
            UPDATE files AS f SET name = array_to_string(v_parts[3:], chr(1)) WHERE f.id = v_file;
        END IF;
        UPDATE jobs AS j SET state = 'complete', updated = p_now
            WHERE j.id = v_job AND j.state != 'complete' AND NOT EXISTS
                (SELECT 1 FROM files AS f WHERE f.job_id = v_job AND f.state != 'complete'
                 AND substr(f.name, 1, 1) NOT IN (chr(1), chr(2)));
        IF FOUND THEN
            INSERT INTO events (id, job_id, kind, payload, created)
            SELECT p_event_id, v_job, 'job.complete', json_build_object(
                'id', p_event_id, 'type', 'job.complete', 'job', json_build_object('id', v_job, 'name', j.name),
                'files', (SELECT COALESCE(json_agg(json_build_object(
                              'name', f.name, 'id', f.id, 'size', f.size,
                              'crc32', lpad(to_hex(f.crc32), 8, '0'), 'digest', f.digest)
                              ORDER BY f.name COLLATE "C"), '[]'::json)
                          FROM files AS f WHERE f.job_id = v_job AND substr(f.name, 1, 1) != chr(2)),
                'time', p_now)::text, p_now
            FROM jobs AS j WHERE j.id = v_job;
            RETURN QUERY SELECT v_job, TRUE;
        ELSE
            RETURN QUERY SELECT v_job, FALSE;
        END IF;
    END $$
    """,
]

MIGRATION_LOCK = 0x66696C65646F636B  # "filedock": the advisory lock every server migrates under
EVENT_LEASE = 300.0
"""Seconds an outbox event stays claimed by the server that took it (renewed at each of its passes):
a server that died lets others deliver its events after this long."""
CONNECT_TIMEOUT = 10
_VISIBLE = "substr(name, 1, 1) NOT IN (chr(1), chr(2))"
"""Not a new version waiting to replace a file (``REPLACEMENT_MARK``) nor a concatenation part
(``PART_MARK``): what listings and job states count."""
_NOT_PART = "substr(name, 1, 1) != chr(2)"
_PART = "substr(name, 1, 1) = chr(2)"
assert REPLACEMENT_MARK == chr(1)

_UNAVAILABLE = "the metadata database cannot be reached; nothing was changed, retry later"


def check_url(url: str) -> str:
    """A ``postgresql://user@host:port/db`` URL, checked; a bad one is ``bad-request`` with why."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise FiledockError(ErrorCode.BAD_REQUEST, f"not a PostgreSQL URL: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise FiledockError(ErrorCode.BAD_REQUEST, f"a PostgreSQL URL starts with postgresql://, not {url[:20]!r}")
    if not parts.path.strip("/") or "/" in parts.path.strip("/"):
        raise FiledockError(ErrorCode.BAD_REQUEST, "a PostgreSQL URL names one database: postgresql://user@host:port/db")
    if not parts.hostname and "host=" not in parts.query:
        raise FiledockError(ErrorCode.BAD_REQUEST, "a PostgreSQL URL names a host: postgresql://user@host:port/db")
    return url


def _unavailable(exc: BaseException) -> FiledockError:
    return FiledockError(ErrorCode.STORE_UNAVAILABLE, f"{_UNAVAILABLE} ({type(exc).__name__})")


class PostgresStore:
    """``MetadataStore`` on a PostgreSQL database; safe to call from several threads (one connection each)."""

    threads = 4
    """How many threads ``DeferredStore`` may run this store on (see ``DeferredStore``)."""

    def __init__(self, url: str, clock=time.time, secret: bytes | None = None,
                 secret_path: str | Path | None = None) -> None:
        """Connect to ``url``, migrating the schema if needed.

        File keys are derived with ``secret`` (or the one read from, or made in, ``secret_path``).
        Every server sharing the database must use the same secret: the first one to open the
        database records a mark of it, and a server with another secret is refused rather than
        let it change every file key under the others' feet.
        """
        self.url = check_url(url)
        self._clock = clock
        if secret is None:
            if secret_path is None:
                raise ValueError("PostgresStore needs the file key secret or the path of its file")
            secret = load_secret(Path(secret_path))
        self._secret = secret
        self._secret_path = secret_path
        self._local = threading.local()
        self._conns: list[psycopg.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self.claimant = uuid.uuid4().hex
        """Names this store (this server) in the outbox's claims."""
        self.migrate()
        self._check_secret()
        # the opening thread's connection is not a store thread's: do not hold it for the server's life
        if getattr(self._local, "conn", None) is not None:
            self._forget(self._local.conn)

    # ------------------------------------------------------------ file keys

    def file_key(self, file_id: str) -> str:
        """The key of file ``file_id`` (see ``SQLiteStore.file_key``: the same derivation)."""
        mac = hmac.new(self._secret, b"filedock file key\0" + file_id.encode("ascii"), hashlib.sha256).digest()
        return str(uuid.UUID(bytes=mac[:16], version=4))

    def _check_secret(self) -> None:
        mark = hashlib.sha256(b"filedock secret mark\0" + self._secret).hexdigest()[:32]

        def check(cur: psycopg.Cursor) -> None:
            # servers starting at once: the first records its mark, the others then compare with it
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cur.execute("SELECT value FROM settings WHERE name = 'file_key_secret'")
            row = cur.fetchone()
            if row is not None and row[0] == mark:
                return
            if row is not None:
                where = f" ({self._secret_path})" if self._secret_path else ""
                raise FiledockError(ErrorCode.CONFLICT,
                                    f"this server's file key secret{where} is not the one the database's file keys "
                                    f"were made with: every server sharing a database needs the same secret file "
                                    f"(copy it from the first server; see docs/deploy.md)")
            cur.execute("SELECT id FROM files")
            ids = [r[0] for r in cur.fetchall()]
            cur.executemany("UPDATE files SET key_hash = %s WHERE id = %s",
                            [(hash_key(self.file_key(i)), i) for i in ids])
            cur.execute("INSERT INTO settings VALUES ('file_key_secret', %s)", (mark,))

        self._write(check)

    def _file(self, row: tuple) -> FileRecord:
        record = FileRecord(self.file_key(row[0]), *row[1:], id=row[0])
        return replace(record, replaces_key=self.file_key(record.replaces)) if record.replaces else record

    # ------------------------------------------------------------ plumbing

    def _conn(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            self._forget(conn)
        if self._closed:
            raise FiledockError(ErrorCode.STORE_UNAVAILABLE, "the metadata store is closed")
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                   application_name="filedock")
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        self._local.conn = conn
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _forget(self, conn: psycopg.Connection) -> None:
        self._local.conn = None
        with self._conns_lock:
            if conn in self._conns:
                self._conns.remove(conn)
        try:
            conn.close()
        except psycopg.Error:
            pass

    def _call(self, fn: Callable[[psycopg.Cursor], T], transaction: bool) -> T:
        for attempt in range(5):
            conn = self._conn()
            try:
                if transaction:
                    with conn.transaction(), conn.cursor() as cur:
                        return fn(cur)
                with conn.cursor() as cur:
                    return fn(cur)
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                if attempt == 4:
                    raise
                time.sleep(0.01 * (attempt + 1))
            except pg_errors.DiskFull as exc:
                raise FiledockError(ErrorCode.NO_SPACE,
                                    "the metadata database's disk is full; nothing was changed, retry later") from exc
            except (pg_errors.AdminShutdown, pg_errors.CannotConnectNow, pg_errors.CrashShutdown) as exc:
                self._forget(conn)
                raise _unavailable(exc) from exc
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if conn.closed or conn.broken:
                    self._forget(conn)
                    raise _unavailable(exc) from exc
                raise
        raise AssertionError("unreachable")

    def _write(self, fn: Callable[[psycopg.Cursor], T]) -> T:
        """``fn(cursor)`` in one transaction, committed (durably: ``synchronous_commit`` as the
        server has it, on by default) before this returns; run again on a deadlock."""
        return self._call(fn, transaction=True)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        def read(cur: psycopg.Cursor) -> list[tuple]:
            cur.execute(sql, args)
            return cur.fetchall()
        return self._call(read, transaction=False)

    def schema_version(self) -> int:
        """The number of migrations applied."""
        rows = self._read("SELECT to_regclass('schema_version') IS NOT NULL")
        if not rows[0][0]:
            return 0
        return self._read("SELECT COALESCE(MAX(version), 0) FROM schema_version")[0][0]

    def migrate(self) -> int:
        """Apply the migrations not yet applied (under an advisory lock: one server at a time)."""
        def apply(cur: psycopg.Cursor) -> int:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            current = cur.fetchone()[0]
            if current > len(MIGRATIONS):
                raise FiledockError(ErrorCode.CONFLICT,
                                    f"the metadata database is at schema version {current}, newer than this "
                                    f"filedock knows ({len(MIGRATIONS)}): upgrade this server")
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                cur.execute(script)
                cur.execute("INSERT INTO schema_version VALUES (%s)", (version,))
            return max(current, len(MIGRATIONS))
        return self._write(apply)

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except psycopg.Error:
                pass

    # ------------------------------------------------------------ tokens

    def create_token(self, label: str, scope: str = SCOPE_ADMIN, job_id: str | None = None) -> str:
        """A new token (shown this once: only its hash is kept) with ``scope``, for one job if ``job_id``."""
        if scope not in SCOPES:
            raise FiledockError(ErrorCode.BAD_REQUEST, f"a scope is one of {', '.join(SCOPES)}")
        token = "fdk_" + secrets.token_urlsafe(32)

        def create(cur: psycopg.Cursor) -> None:
            if job_id is not None:
                cur.execute("SELECT 1 FROM jobs WHERE id = %s", (job_id,))
                if cur.fetchone() is None:
                    raise FiledockError(ErrorCode.NOT_FOUND, "no such job")
            cur.execute(f"INSERT INTO tokens ({_TOKEN_COLS}) VALUES (%s, %s, %s, %s, %s)",
                        (hash_token(token), label, scope, job_id, self._clock()))
        self._write(create)
        return token

    @staticmethod
    def _grant(row: tuple) -> TokenGrant:
        return TokenGrant(row[0][:TOKEN_ID_LENGTH], row[1], row[2], row[3], row[4])

    def check_token(self, token: str) -> TokenGrant | None:
        """What ``token`` grants, or None for a token the store does not know."""
        rows = self._read(f"SELECT {_TOKEN_COLS} FROM tokens WHERE hash = %s", (hash_token(token),))
        return self._grant(rows[0]) if rows else None

    def list_tokens(self) -> list[TokenGrant]:
        """Every token's grant, oldest first (never the tokens themselves: they are not kept)."""
        return [self._grant(r) for r in self._read(f"SELECT {_TOKEN_COLS} FROM tokens ORDER BY created")]

    def revoke_token(self, token_id: str) -> bool:
        """Delete the token named ``token_id`` (see ``TokenGrant.id``); False if there is none."""
        if len(token_id) != TOKEN_ID_LENGTH or any(c not in "0123456789abcdef" for c in token_id):
            return False

        def revoke(cur: psycopg.Cursor) -> bool:
            cur.execute("DELETE FROM tokens WHERE substr(hash, 1, %s) = %s", (TOKEN_ID_LENGTH, token_id))
            return cur.rowcount > 0
        return self._write(revoke)

    def delete_tokens(self, label: str) -> int:
        def delete(cur: psycopg.Cursor) -> int:
            cur.execute("DELETE FROM tokens WHERE label = %s", (label,))
            return cur.rowcount
        return self._write(delete)

    # ------------------------------------------------------------ jobs

    @staticmethod
    def _job(row: tuple) -> Job:
        return Job(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])

    def create_job(self, name: str, metadata: dict[str, Any]) -> Job:
        now = self._clock()
        job = Job(new_key(), name, dict(metadata), now, now, JOB_OPEN)
        try:
            self._write(lambda cur: cur.execute(f"INSERT INTO jobs ({_JOB_COLS}) VALUES (%s, %s, %s, %s, %s, %s)",
                                                (job.id, name, json.dumps(metadata), now, now, JOB_OPEN)))
        except pg_errors.UniqueViolation:
            raise FiledockError(ErrorCode.CONFLICT, f"a job named {name!r} exists already") from None
        return job

    def list_jobs(self) -> list[Job]:
        return [self._job(r) for r in self._read(f"SELECT {_JOB_COLS} FROM jobs ORDER BY created, seq")]

    def find_job(self, id_or_name: str) -> Job | None:
        rows = self._read(f"SELECT {_JOB_COLS} FROM jobs WHERE id = %s OR name = %s ORDER BY id = %s DESC LIMIT 1",
                          (id_or_name, id_or_name, id_or_name))  # an id wins over a name
        return self._job(rows[0]) if rows else None

    def update_job(self, job_id: str, name: str | None, metadata: dict[str, Any] | None) -> Job:
        def update(cur: psycopg.Cursor) -> None:
            if name is not None:
                cur.execute("UPDATE jobs SET name = %s WHERE id = %s", (name, job_id))
            if metadata is not None:
                cur.execute("UPDATE jobs SET metadata = %s WHERE id = %s", (json.dumps(metadata), job_id))
            cur.execute("UPDATE jobs SET updated = %s WHERE id = %s", (self._clock(), job_id))
        try:
            self._write(update)
        except pg_errors.UniqueViolation:
            raise FiledockError(ErrorCode.CONFLICT, f"a job named {name!r} exists already") from None
        job = self.find_job(job_id)
        if job is None:
            raise FiledockError(ErrorCode.NOT_FOUND, "no such job")
        return job

    def delete_job(self, job_id: str) -> list[FileRecord]:
        def delete(cur: psycopg.Cursor) -> list[FileRecord]:
            cur.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            cur.execute(f"SELECT {_FILE_COLS} FROM files WHERE job_id = %s", (job_id,))
            files = [self._file(r) for r in cur.fetchall()]
            cur.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
            return files
        return self._write(delete)

    # ------------------------------------------------------------ summaries (what a dashboard polls)

    def change_count(self) -> int:
        """A number that changes whenever any transaction commits (an ``ETag`` for polls).

        A number from the database's current snapshot (its xmin, xmax and the transactions in
        progress): if nothing committed in between, two readings are equal; once anything has
        committed (on any server), they differ. Read before the data, it is never newer than the
        data read after it. Other databases of the same PostgreSQL cluster change it too (a poll
        then reads again for nothing; never the other way round).
        """
        (text,) = self._read("SELECT pg_current_snapshot()::text")[0]
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")

    def job_summaries(self, limit: int, offset: int = 0) -> list[tuple[Job, int, int, int, int]]:
        """Jobs in creation order, a page of them, each with its counts (see ``SQLiteStore.job_summaries``)."""
        rows = self._read(
            f"SELECT {', '.join('j.' + c.strip() for c in _JOB_COLS.split(','))}, COALESCE(c.files, 0), "
            "COALESCE(c.complete, 0), COALESCE(c.bytes_total, 0), COALESCE(c.bytes_received, 0) "
            "FROM jobs AS j LEFT JOIN job_counts AS c ON c.job_id = j.id ORDER BY j.created, j.seq "
            "LIMIT %s OFFSET %s", (None if limit < 0 else limit, offset))
        return [(self._job(r[:6]), r[6], r[7], r[8], r[9]) for r in rows]

    def job_counts(self, job_id: str) -> tuple[int, int, int, int]:
        """One job's (files, complete files, bytes declared, bytes received), as the triggers keep them."""
        rows = self._read("SELECT files, complete, bytes_total, bytes_received FROM job_counts WHERE job_id = %s",
                          (job_id,))
        return tuple(rows[0]) if rows else (0, 0, 0, 0)

    def count_jobs(self) -> int:
        """How many jobs there are."""
        return self._read("SELECT COUNT(*) FROM jobs")[0][0]

    def files_page(self, job_id: str, limit: int, offset: int = 0) -> list[FileRecord]:
        """A page of a job's files in name order (``list_files`` is every one of them)."""
        return [self._file(r) for r in self._read(
            f"SELECT {_FILE_COLS} FROM files WHERE job_id = %s AND {_VISIBLE} ORDER BY name COLLATE \"C\" "
            f"LIMIT %s OFFSET %s", (job_id, None if limit < 0 else limit, offset))]

    # ------------------------------------------------------------ files

    def add_file(self, job_id: str, name: str, size: int, quota: int | None = None) -> FileRecord:
        return self.add_files(job_id, [(name, size)], quota)[0]

    def add_files(self, job_id: str, entries: list[tuple[str, int]], quota: int | None = None,
                  replace: frozenset[str] = frozenset()) -> list[FileRecord]:
        """Declare files, all or none, in one transaction (see ``SQLiteStore.add_files``).

        The job's row is locked first (as ``record_complete`` does), so that a quota holds
        against declarations made on other servers at the same time.
        """
        now = self._clock()
        ids = [new_key() for _ in entries]
        fresh_records = [FileRecord(self.file_key(i), job_id, name, size, 0, FILE_PENDING, 0, None, None, now, id=i)
                         for i, (name, size) in zip(ids, entries)]

        def add(cur: psycopg.Cursor) -> list[FileRecord]:
            cur.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            if cur.fetchone() is None:
                raise FiledockError(ErrorCode.NOT_FOUND, "no such job")
            if quota is not None:
                cur.execute("SELECT COALESCE(SUM(size), 0) FROM files WHERE job_id = %s", (job_id,))
                (used,) = cur.fetchone()
                if used + sum(size for _, size in entries) > quota:
                    raise FiledockError(ErrorCode.QUOTA_EXCEEDED,
                                        f"job quota is {quota} bytes; {used} are declared already")
            new_ids = {r.id for r in fresh_records}
            records = [self._new_version(cur, r) if r.name in replace else r for r in fresh_records]
            fresh = [r for r in records if r.id in new_ids]
            cur.executemany(f"INSERT INTO files ({_FILE_COLS}, key_hash) "
                            f"VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                            [(r.id, job_id, r.name, r.size, 0, FILE_PENDING, 0, None, None, now, None,
                              hash_key(r.key)) for r in fresh])
            if any(not r.replaces and not r.is_part for r in fresh):  # a hidden record never reopens its job
                cur.execute("UPDATE jobs SET state = %s, updated = %s WHERE id = %s", (JOB_OPEN, now, job_id))
            return records
        try:
            return self._write(add)
        except pg_errors.UniqueViolation:
            names = ", ".join(repr(n) for n, _ in entries[:3])
            raise FiledockError(ErrorCode.CONFLICT, f"the job has a file named {names} already"
                                if len(entries) == 1 else f"the job has one of these files already: {names}...") \
                from None

    def _new_version(self, cur: psycopg.Cursor, record: FileRecord) -> FileRecord:
        """``record`` as a new version of the job's file of its name (``add_files(replace=...)``)."""
        cur.execute("SELECT id FROM files WHERE job_id = %s AND name = %s", (record.job_id, record.name))
        old = cur.fetchone()
        if old is None:
            return record
        cur.execute(f"SELECT {_FILE_COLS} FROM files WHERE job_id = %s AND name = %s",
                    (record.job_id, replacement_name(old[0], record.name)))
        row = cur.fetchone()
        if row is not None:
            waiting = self._file(row)
            if waiting.size != record.size:
                cur.execute("UPDATE files SET size = %s, received = 0, crc32 = 0, part_stamp = NULL, state = %s, "
                            "updated = %s WHERE id = %s", (record.size, FILE_PENDING, self._clock(), waiting.id))
                return replace(waiting, size=record.size, received=0, crc32=0, part_stamp=None,
                               state=FILE_PENDING, updated=self._clock())
            return waiting
        return replace(record, name=replacement_name(old[0], record.name), replaces_key=self.file_key(old[0]))

    def list_files(self, job_id: str) -> list[FileRecord]:
        """The job's files by name (new versions still waiting to replace one are left out)."""
        return [self._file(r) for r in self._read(
            f"SELECT {_FILE_COLS} FROM files WHERE job_id = %s AND {_VISIBLE} ORDER BY name COLLATE \"C\"",
            (job_id,))]

    def get_file(self, key: str) -> FileRecord | None:
        rows = self._read(f"SELECT {_FILE_COLS} FROM files WHERE key_hash = %s", (hash_key(key),))
        return self._file(rows[0]) if rows else None

    def record_progress(self, key: str, received: int, crc32: int, part_stamp: str | None) -> None:
        state = FILE_PARTIAL if received else FILE_PENDING
        self._call(lambda cur: cur.execute(
            "UPDATE files SET received = %s, crc32 = %s, part_stamp = %s, state = %s, updated = %s "
            "WHERE key_hash = %s AND state != %s",
            (received, crc32, part_stamp, state, self._clock(), hash_key(key), FILE_COMPLETE)),
            transaction=False)  # one statement: its own transaction, committed before this returns

    def record_complete(self, key: str, crc32: int, digest: str) -> bool:
        """Mark a file complete; returns True if that made its job complete (exactly once, whichever
        servers complete the job's files at the same moment). One statement, so one round trip:
        ``filedock_complete_file`` (migration 2) does what ``_complete`` and ``_maybe_complete_job`` do."""
        def complete(cur: psycopg.Cursor) -> bool:
            cur.execute("SELECT job_id, became_complete FROM filedock_complete_file(%s, %s, %s, %s, %s)",
                        (hash_key(key), crc32, digest, self._clock(), new_key()))
            row = cur.fetchone()
            if row is None:
                raise FiledockError(ErrorCode.GONE, "the file was deleted during the upload")
            return bool(row[1])
        return self._call(complete, transaction=False)  # one statement: its own transaction, committed

    def record_complete_many(self, items: list[tuple[str, int, str]]) -> list[str]:
        """Mark many files complete in one transaction (a batch); returns the jobs that became complete.

        A handful of statements whatever the number of files (a batch holds up to a thousand):
        the jobs locked in one order (two batches never deadlock), the files' rows locked, the
        plain files updated in one statement; a new version replacing a file goes one by one.
        """
        def complete(cur: psycopg.Cursor) -> list[str]:
            now = self._clock()
            hashes = [hash_key(key) for key, _, _ in items]
            cur.execute("SELECT DISTINCT job_id FROM files WHERE key_hash = ANY(%s) ORDER BY job_id", (hashes,))
            for (job_id,) in cur.fetchall():
                cur.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            cur.execute("SELECT key_hash, job_id, name FROM files WHERE key_hash = ANY(%s) FOR UPDATE", (hashes,))
            found = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
            if len(found) < len(set(hashes)):
                raise FiledockError(ErrorCode.GONE, "the file was deleted during the upload")
            plain = [(h, crc32, digest) for h, (_, crc32, digest) in zip(hashes, items)
                     if not found[h][1].startswith(REPLACEMENT_MARK)]
            if plain:
                cur.execute(
                    "UPDATE files AS f SET state = %s, received = f.size, crc32 = v.crc32, digest = v.digest, "
                    "uploaded_at = %s, updated = %s, part_stamp = NULL "
                    "FROM unnest(%s::text[], %s::bigint[], %s::text[]) AS v(key_hash, crc32, digest) "
                    "WHERE f.key_hash = v.key_hash",
                    (FILE_COMPLETE, now, now, [p[0] for p in plain], [p[1] for p in plain], [p[2] for p in plain]))
            for key, crc32, digest in items:
                if found[hash_key(key)][1].startswith(REPLACEMENT_MARK):
                    self._complete(cur, key, crc32, digest, now)
            jobs = {job_id for job_id, name in found.values() if not name.startswith(PART_MARK)}
            return [job_id for job_id in sorted(jobs) if self._maybe_complete_job(cur, job_id, now)]
        return self._write(complete)

    @staticmethod
    def _complete(cur: psycopg.Cursor, key: str, crc32: int, digest: str, now: float) -> str:
        # the job first, then its file: the order every writer takes them in
        cur.execute("SELECT id FROM jobs WHERE id = (SELECT job_id FROM files WHERE key_hash = %s) FOR UPDATE",
                    (hash_key(key),))
        if cur.fetchone() is None:
            raise FiledockError(ErrorCode.GONE, "the file was deleted during the upload")
        cur.execute("UPDATE files SET state = %s, received = size, crc32 = %s, digest = %s, uploaded_at = %s, "
                    "updated = %s, part_stamp = NULL WHERE key_hash = %s RETURNING id, job_id, name",
                    (FILE_COMPLETE, crc32, digest, now, now, hash_key(key)))
        row = cur.fetchone()
        if row is None:
            raise FiledockError(ErrorCode.GONE, "the file was deleted during the upload")
        file_id, job_id, name = row
        if name.startswith(REPLACEMENT_MARK):  # a new version: it takes the old one's place in the same transaction
            _, replaced, public_name = name.split(REPLACEMENT_MARK, 2)
            cur.execute("DELETE FROM files WHERE id = %s", (replaced,))
            cur.execute("UPDATE files SET name = %s WHERE id = %s", (public_name, file_id))
        return job_id

    def _maybe_complete_job(self, cur: psycopg.Cursor, job_id: str, now: float) -> bool:
        """A job whose files are all complete becomes complete, once, with its event in the outbox.

        The caller holds the job's row lock (``_complete``), so this statement sees every other
        server's completions of this job's files that committed before it.
        """
        cur.execute(f"UPDATE jobs SET state = %s, updated = %s WHERE id = %s AND state != %s AND NOT EXISTS "
                    f"(SELECT 1 FROM files WHERE job_id = %s AND state != %s AND {_VISIBLE})",
                    (JOB_COMPLETE, now, job_id, JOB_COMPLETE, job_id, FILE_COMPLETE))
        if cur.rowcount:
            self._add_event(cur, job_id, "job.complete", now)
        return bool(cur.rowcount)

    def files_by_keys(self, keys: list[str]) -> list[FileRecord]:
        """The records of these keys (unknown keys are left out)."""
        if not keys:
            return []
        return [self._file(r) for r in self._read(f"SELECT {_FILE_COLS} FROM files WHERE key_hash = ANY(%s)",
                                                  ([hash_key(key) for key in keys],))]

    def _add_event(self, cur: psycopg.Cursor, job_id: str, kind: str, now: float) -> None:
        cur.execute("SELECT name FROM jobs WHERE id = %s", (job_id,))
        (name,) = cur.fetchone()
        cur.execute(f"SELECT name, id, size, crc32, digest FROM files WHERE job_id = %s AND {_NOT_PART} "
                    f"ORDER BY name COLLATE \"C\"", (job_id,))
        files = [{"name": r[0], "id": r[1], "size": r[2], "crc32": f"{r[3]:08x}", "digest": r[4]}
                 for r in cur.fetchall()]
        event_id = new_key()
        payload = {"id": event_id, "type": kind, "job": {"id": job_id, "name": name}, "files": files,
                   "time": now}
        cur.execute("INSERT INTO events (id, job_id, kind, payload, created) VALUES (%s, %s, %s, %s, %s)",
                    (event_id, job_id, kind, json.dumps(payload), now))

    def record_range_blocks(self, key: str, blocks: list[tuple[int, str, int]]) -> None:
        """Blocks of a ranged upload are durable on disk: record them (index, hash hex, CRC-32), mark
        the file's progress as ranged and count its durable bytes in ``received``."""
        def record(cur: psycopg.Cursor) -> None:
            cur.execute("SELECT id FROM files WHERE key_hash = %s AND state != %s FOR UPDATE",
                        (hash_key(key), FILE_COMPLETE))
            row = cur.fetchone()
            if row is None:
                return
            cur.executemany("INSERT INTO range_blocks (file_id, block, hash, crc32) VALUES (%s, %s, %s, %s) "
                            "ON CONFLICT (file_id, block) DO UPDATE SET hash = EXCLUDED.hash, crc32 = EXCLUDED.crc32",
                            [(row[0], i, h, c) for i, h, c in blocks])
            cur.execute("UPDATE files SET part_stamp = %s, state = %s, updated = %s, received = (SELECT "
                        "COALESCE(SUM(LEAST(files.size - block * %s, %s)), 0) FROM range_blocks "
                        "WHERE file_id = files.id) WHERE id = %s",
                        (RANGED_STAMP, FILE_PARTIAL, self._clock(), BLOCK_SIZE, BLOCK_SIZE, row[0]))
        self._write(record)

    def range_blocks(self, key: str) -> list[tuple[int, str, int]]:
        """The durable blocks of a ranged upload: (index, hash hex, CRC-32), by index."""
        return [tuple(r) for r in self._read(
            "SELECT block, hash, crc32 FROM range_blocks WHERE file_id = (SELECT id FROM files WHERE key_hash = %s) "
            "ORDER BY block", (hash_key(key),))]

    def reset_file(self, key: str, force: bool = False) -> None:
        """Back to pending with nothing received; a complete file only with ``force`` (fsck)."""
        def reset(cur: psycopg.Cursor) -> None:
            if force:  # the job first, as every writer that changes a job does
                cur.execute("SELECT 1 FROM jobs WHERE id = (SELECT job_id FROM files WHERE key_hash = %s) "
                            "FOR UPDATE", (hash_key(key),))
            cur.execute("DELETE FROM range_blocks WHERE file_id = (SELECT id FROM files WHERE key_hash = %s)",
                        (hash_key(key),))
            cur.execute("UPDATE files SET received = 0, crc32 = 0, state = %s, part_stamp = NULL, digest = NULL, "
                        "uploaded_at = NULL, updated = %s WHERE key_hash = %s AND (state != %s OR %s)",
                        (FILE_PENDING, self._clock(), hash_key(key), FILE_COMPLETE, force))
            if force:
                cur.execute("UPDATE jobs SET state = %s WHERE id = (SELECT job_id FROM files WHERE key_hash = %s)",
                            (JOB_OPEN, hash_key(key)))
        self._write(reset)

    def delete_file(self, key: str) -> bool:
        """Forget a file that is not complete (an HTTP upload terminated by its client); False if there
        is no such unfinished file."""
        def delete(cur: psycopg.Cursor) -> bool:
            # the job first, as every writer that changes a job's files does (one lock order)
            cur.execute("SELECT 1 FROM jobs WHERE id = (SELECT job_id FROM files WHERE key_hash = %s) FOR UPDATE",
                        (hash_key(key),))
            cur.execute("DELETE FROM files WHERE key_hash = %s AND state != %s", (hash_key(key), FILE_COMPLETE))
            return cur.rowcount > 0
        return self._write(delete)

    def set_upload_info(self, key: str, length_deferred: bool, upload_concat: str | None) -> None:
        """See ``SQLiteStore.set_upload_info``."""
        self._call(lambda cur: cur.execute(
            "UPDATE files SET length_deferred = %s, upload_concat = %s WHERE key_hash = %s",
            (length_deferred, upload_concat, hash_key(key))), transaction=False)

    def upload_info(self, key: str) -> tuple[bool, str | None]:
        """(length deferred, ``Upload-Concat``) of a file; (False, None) for an unknown one."""
        rows = self._read("SELECT length_deferred, upload_concat FROM files WHERE key_hash = %s", (hash_key(key),))
        return (bool(rows[0][0]), rows[0][1]) if rows else (False, None)

    def declare_length(self, key: str, size: int, quota: int | None = None) -> FileRecord:
        """See ``SQLiteStore.declare_length``; the job's row is locked first, as ``add_files`` does."""
        def declare(cur: psycopg.Cursor) -> FileRecord:
            cur.execute("SELECT 1 FROM jobs WHERE id = (SELECT job_id FROM files WHERE key_hash = %s) FOR UPDATE",
                        (hash_key(key),))
            cur.execute(f"SELECT {_FILE_COLS}, length_deferred FROM files WHERE key_hash = %s FOR UPDATE",
                        (hash_key(key),))
            row = cur.fetchone()
            if row is None:
                raise FiledockError(ErrorCode.UNKNOWN_FILE, "no such upload")
            record = self._file(row[:-1])
            if not row[-1]:
                if record.size != size:
                    raise FiledockError(ErrorCode.SIZE_MISMATCH, f"the upload is {record.size} bytes, not {size}")
                return record
            if size < record.received:
                raise FiledockError(ErrorCode.SIZE_MISMATCH, f"the upload holds {record.received} bytes already")
            if quota is not None:
                cur.execute("SELECT COALESCE(SUM(size), 0) FROM files WHERE job_id = %s", (record.job_id,))
                (used,) = cur.fetchone()
                if used + size > quota:
                    raise FiledockError(ErrorCode.QUOTA_EXCEEDED,
                                        f"job quota is {quota} bytes; {used} are declared already")
            cur.execute("UPDATE files SET size = %s, length_deferred = FALSE WHERE id = %s", (size, record.id))
            return replace(record, size=size)
        return self._write(declare)

    def delete_parts(self, keys: list[str]) -> int:
        """Forget concatenation parts (see ``SQLiteStore.delete_parts``); returns how many went."""
        def delete(cur: psycopg.Cursor) -> int:
            hashes = [hash_key(key) for key in keys]
            cur.execute("SELECT DISTINCT job_id FROM files WHERE key_hash = ANY(%s) ORDER BY job_id", (hashes,))
            for (job_id,) in cur.fetchall():  # the jobs first: one lock order for every writer
                cur.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            cur.execute(f"DELETE FROM files WHERE key_hash = ANY(%s) AND {_PART}", (hashes,))
            return cur.rowcount
        return self._write(delete) if keys else 0

    def stale_parts(self, older_than: float) -> list[FileRecord]:
        """Concatenation parts untouched since ``older_than`` (complete or not): abandoned, the sweeper's."""
        return [self._file(r) for r in self._read(
            f"SELECT {_FILE_COLS} FROM files WHERE {_PART} AND updated < %s", (older_than,))]

    def all_files(self) -> list[FileRecord]:
        """Every file record (fsck)."""
        return [self._file(r) for r in self._read(
            f"SELECT {_FILE_COLS} FROM files ORDER BY job_id, name COLLATE \"C\"")]

    def unfinished_files(self) -> list[FileRecord]:
        """Every file not complete (the start-up check for complete files never recorded)."""
        return [self._file(r) for r in self._read(f"SELECT {_FILE_COLS} FROM files WHERE state != %s",
                                                   (FILE_COMPLETE,))]

    def stale_partials(self, older_than: float) -> list[FileRecord]:
        return [self._file(r) for r in self._read(
            f"SELECT {_FILE_COLS} FROM files WHERE state = %s AND updated < %s AND {_NOT_PART}",
            (FILE_PARTIAL, older_than))]

    # ------------------------------------------------------------ sessions

    def open_session(self, job_id: str, ttl: float, scope: str = SCOPE_ADMIN) -> Session:
        now = self._clock()
        session = Session(new_key(), job_id, now, now + ttl, None, scope)

        def open_(cur: psycopg.Cursor) -> None:
            cur.execute("SELECT 1 FROM jobs WHERE id = %s", (job_id,))
            if cur.fetchone() is None:
                raise FiledockError(ErrorCode.NOT_FOUND, "no such job")
            cur.execute(f"INSERT INTO sessions ({_SESSION_COLS}) VALUES (%s, %s, %s, %s, %s, %s)",
                        (hash_key(session.key), job_id, now, session.expires, None, scope))
        self._write(open_)
        return session

    def get_session(self, key: str) -> Session | None:
        """The session of ``key`` (the record carries ``key`` as given: only its hash is stored)."""
        rows = self._read(f"SELECT {_SESSION_COLS} FROM sessions WHERE key_hash = %s", (hash_key(key),))
        return Session(key, *rows[0][1:]) if rows else None

    def session_and_file(self, session_key: str, file_key: str) -> tuple[Session | None, FileRecord | None]:
        """Both records a data-port request needs, in one round trip."""
        rows = self._read(
            f"SELECT s.key_hash, s.job_id, s.created, s.expires, s.closed, s.scope, "
            f"{', '.join('f.' + c.strip() for c in _FILE_COLS.split(','))} "
            f"FROM (SELECT 1) AS one LEFT JOIN sessions AS s ON s.key_hash = %s "
            f"LEFT JOIN files AS f ON f.key_hash = %s", (hash_key(session_key), hash_key(file_key)))
        row = rows[0]
        session = Session(session_key, *row[1:6]) if row[0] is not None else None
        record = self._file(row[6:]) if row[6] is not None else None
        return session, record

    def close_session(self, key: str) -> Session | None:
        self._write(lambda cur: cur.execute("UPDATE sessions SET closed = %s WHERE key_hash = %s AND closed IS NULL",
                                            (self._clock(), hash_key(key))))
        return self.get_session(key)

    # ------------------------------------------------------------ outbox

    def _with_keys(self, payload: dict[str, Any]) -> dict[str, Any]:
        for entry in payload.get("files", []):
            entry["key"] = self.file_key(entry.pop("id", None) or entry["key"])
        return payload

    def pending_events(self, limit: int = 100) -> list[Event]:
        """Undelivered events this server may deliver now: claimed for it (for ``EVENT_LEASE``
        seconds, renewed at each call) and never one another live server has claimed."""
        def claim(cur: psycopg.Cursor) -> list[tuple]:
            now = self._clock()
            cur.execute(
                "SELECT id FROM events WHERE delivered IS NULL "
                "AND (claimed_by IS NULL OR claimed_by = %s OR lease_until < %s) "
                "ORDER BY created LIMIT %s FOR UPDATE SKIP LOCKED", (self.claimant, now, limit))
            ids = [r[0] for r in cur.fetchall()]
            if not ids:
                return []
            cur.execute("UPDATE events SET claimed_by = %s, lease_until = %s WHERE id = ANY(%s)",
                        (self.claimant, now + EVENT_LEASE, ids))
            cur.execute("SELECT id, job_id, kind, payload, created, attempts, delivered, delivered_to FROM events "
                        "WHERE id = ANY(%s) ORDER BY created", (ids,))
            return cur.fetchall()
        return [Event(r[0], r[1], r[2], self._with_keys(json.loads(r[3])), r[4], r[5], r[6], tuple(json.loads(r[7])))
                for r in self._write(claim)]

    def mark_event(self, event_id: str, delivered: bool, delivered_to: list[str] | None = None) -> None:
        """One delivery attempt: ``delivered`` when every target took it; ``delivered_to`` the ones that did.
        An event not delivered stays claimed by this server, which retries it after its backoff."""
        def mark(cur: psycopg.Cursor) -> None:
            if delivered_to is not None:
                cur.execute("UPDATE events SET delivered_to = %s WHERE id = %s", (json.dumps(delivered_to), event_id))
            if delivered:
                cur.execute("UPDATE events SET delivered = %s, attempts = attempts + 1, claimed_by = NULL, "
                            "lease_until = NULL WHERE id = %s", (self._clock(), event_id))
            else:
                cur.execute("UPDATE events SET attempts = attempts + 1 WHERE id = %s", (event_id,))
        self._write(mark)
