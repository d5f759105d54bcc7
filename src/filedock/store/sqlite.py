"""All of filedock's SQL, for the embedded SQLite store (one file in the data dir).

Schema changes are numbered migrations applied in order at open; the version is
kept in ``schema_version``. Writes run in ``BEGIN IMMEDIATE`` transactions with
``synchronous=FULL``: once a method returns, what it wrote survives a crash.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from filedock.errors import ErrorCode, FiledockError
from filedock.store.model import (
    FILE_COMPLETE, FILE_PARTIAL, FILE_PENDING, JOB_COMPLETE, JOB_OPEN, Event, FileRecord, Job,
    Session, replacement_name,
)

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        label TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        metadata TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        updated REAL NOT NULL,
        state TEXT NOT NULL
    );
    CREATE TABLE sessions (
        key TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        created REAL NOT NULL,
        expires REAL NOT NULL,
        closed REAL
    );
    CREATE TABLE files (
        key TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        received INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL,
        crc32 INTEGER NOT NULL DEFAULT 0,
        digest TEXT,
        uploaded_at REAL,
        updated REAL NOT NULL,
        part_stamp TEXT,
        UNIQUE (job_id, name)
    );
    CREATE INDEX files_state ON files(state, updated);
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        created REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        delivered REAL
    );
    CREATE INDEX events_pending ON events(delivered, created);
    """,
    # 2: remember which targets accepted an event, so a retry goes only to the others
    """
    ALTER TABLE events ADD COLUMN delivered_to TEXT NOT NULL DEFAULT '[]'
    """,
]

_FILE_COLS = "key, job_id, name, size, received, state, crc32, digest, uploaded_at, updated, part_stamp"
_VISIBLE = "substr(name, 1, 1) != char(1)"
"""Not a new version waiting to replace a file (``REPLACEMENT_MARK``): what listings and job states count."""
_JOB_COLS = "id, name, metadata, created, updated, state"
_SESSION_COLS = "key, job_id, created, expires, closed"


def hash_token(token: str) -> str:
    """Tokens are stored as their SHA-256: a stolen database grants nothing."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A session or file key: a UUID4, 122 random bits from the OS."""
    return str(uuid.uuid4())


class SQLiteStore:
    """``MetadataStore`` on one SQLite file. Safe to call from one thread at a time."""

    def __init__(self, path: str | Path, clock=time.time) -> None:
        self.path = str(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        self.migrate()

    # ------------------------------------------------------------ plumbing

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def schema_version(self) -> int:
        """The number of migrations applied."""
        self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return row[0] or 0

    def migrate(self) -> int:
        """Apply the migrations not yet applied; returns the schema version."""
        with self._lock:
            current = self.schema_version()
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in filter(str.strip, script.split(";")):
                        self._db.execute(statement)
                    self._db.execute("INSERT INTO schema_version VALUES (?)", (version,))
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            return self.schema_version()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ tokens

    def create_token(self, label: str) -> str:
        token = "fdk_" + secrets.token_urlsafe(32)
        with self._write() as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?)", (hash_token(token), label, self._clock()))
        return token

    def check_token(self, token: str) -> bool:
        return bool(self._read("SELECT 1 FROM tokens WHERE hash = ?", (hash_token(token),)))

    def delete_tokens(self, label: str) -> int:
        with self._write() as db:
            return db.execute("DELETE FROM tokens WHERE label = ?", (label,)).rowcount

    # ------------------------------------------------------------ jobs

    @staticmethod
    def _job(row: tuple) -> Job:
        return Job(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])

    def create_job(self, name: str, metadata: dict[str, Any]) -> Job:
        now = self._clock()
        job = Job(new_key(), name, dict(metadata), now, now, JOB_OPEN)
        try:
            with self._write() as db:
                db.execute(f"INSERT INTO jobs ({_JOB_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                           (job.id, name, json.dumps(metadata), now, now, JOB_OPEN))
        except sqlite3.IntegrityError:
            raise FiledockError(ErrorCode.CONFLICT, f"a job named {name!r} exists already") from None
        return job

    def list_jobs(self) -> list[Job]:
        return [self._job(r) for r in self._read(f"SELECT {_JOB_COLS} FROM jobs ORDER BY created")]

    def find_job(self, id_or_name: str) -> Job | None:
        rows = self._read(f"SELECT {_JOB_COLS} FROM jobs WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
                          (id_or_name, id_or_name, id_or_name))  # an id wins over a name
        return self._job(rows[0]) if rows else None

    def update_job(self, job_id: str, name: str | None, metadata: dict[str, Any] | None) -> Job:
        try:
            with self._write() as db:
                if name is not None:
                    db.execute("UPDATE jobs SET name = ? WHERE id = ?", (name, job_id))
                if metadata is not None:
                    db.execute("UPDATE jobs SET metadata = ? WHERE id = ?", (json.dumps(metadata), job_id))
                db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (self._clock(), job_id))
        except sqlite3.IntegrityError:
            raise FiledockError(ErrorCode.CONFLICT, f"a job named {name!r} exists already") from None
        job = self.find_job(job_id)
        if job is None:
            raise FiledockError(ErrorCode.NOT_FOUND, "no such job")
        return job

    def delete_job(self, job_id: str) -> list[FileRecord]:
        with self._write() as db:
            files = [FileRecord(*r) for r in db.execute(
                f"SELECT {_FILE_COLS} FROM files WHERE job_id = ?", (job_id,)).fetchall()]
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return files

    # ------------------------------------------------------------ files

    def add_file(self, job_id: str, name: str, size: int, quota: int | None = None) -> FileRecord:
        return self.add_files(job_id, [(name, size)], quota)[0]

    def add_files(self, job_id: str, entries: list[tuple[str, int]], quota: int | None = None,
                  replace: frozenset[str] = frozenset()) -> list[FileRecord]:
        """Declare files, all or none, in one transaction (a conflict or the quota refuses the lot).

        A name in ``replace`` that the job holds already is declared as a new version of
        that file (``FileRecord.replaces``): invisible in listings, it takes the file's place
        when it is complete. A new version of that name waiting already is returned again
        (with another size: started again from 0 at that size).
        """
        now = self._clock()
        records = [FileRecord(new_key(), job_id, name, size, 0, FILE_PENDING, 0, None, None, now)
                   for name, size in entries]
        try:
            with self._write() as db:
                if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                    raise FiledockError(ErrorCode.NOT_FOUND, "no such job")
                if quota is not None:
                    (used,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM files WHERE job_id = ?",
                                         (job_id,)).fetchone()
                    if used + sum(size for _, size in entries) > quota:
                        raise FiledockError(ErrorCode.QUOTA_EXCEEDED,
                                            f"job quota is {quota} bytes; {used} are declared already")
                new_keys = {r.key for r in records}
                records = [self._new_version(db, r) if r.name in replace else r for r in records]
                fresh = [r for r in records if r.key in new_keys]  # not a waiting version returned again
                db.executemany(f"INSERT INTO files ({_FILE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                               [(r.key, job_id, r.name, r.size, 0, FILE_PENDING, 0, None, None, now, None)
                                for r in fresh])
                if any(not r.replaces for r in fresh):
                    db.execute("UPDATE jobs SET state = ?, updated = ? WHERE id = ?", (JOB_OPEN, now, job_id))
        except sqlite3.IntegrityError:
            names = ", ".join(repr(n) for n, _ in entries[:3])
            raise FiledockError(ErrorCode.CONFLICT, f"the job has a file named {names} already"
                                if len(entries) == 1 else f"the job has one of these files already: {names}...") \
                from None
        return records

    def _new_version(self, db: sqlite3.Connection, record: FileRecord) -> FileRecord:
        """``record`` as a new version of the job's file of its name (``add_files(replace=...)``)."""
        old = db.execute("SELECT key FROM files WHERE job_id = ? AND name = ?",
                         (record.job_id, record.name)).fetchone()
        if old is None:
            return record  # nothing to replace: a plain declaration
        row = db.execute(f"SELECT {_FILE_COLS} FROM files WHERE job_id = ? AND name = ?",
                         (record.job_id, replacement_name(old[0], record.name))).fetchone()
        if row is not None:
            waiting = FileRecord(*row)
            if waiting.size != record.size:
                db.execute("UPDATE files SET size = ?, received = 0, crc32 = 0, part_stamp = NULL, state = ?, "
                           "updated = ? WHERE key = ?", (record.size, FILE_PENDING, self._clock(), waiting.key))
                return replace(waiting, size=record.size, received=0, crc32=0, part_stamp=None,
                               state=FILE_PENDING, updated=self._clock())
            return waiting
        return replace(record, name=replacement_name(old[0], record.name))

    def list_files(self, job_id: str) -> list[FileRecord]:
        """The job's files by name (new versions still waiting to replace one are left out)."""
        return [FileRecord(*r) for r in self._read(
            f"SELECT {_FILE_COLS} FROM files WHERE job_id = ? AND {_VISIBLE} ORDER BY name", (job_id,))]

    def get_file(self, key: str) -> FileRecord | None:
        rows = self._read(f"SELECT {_FILE_COLS} FROM files WHERE key = ?", (key,))
        return FileRecord(*rows[0]) if rows else None

    def record_progress(self, key: str, received: int, crc32: int, part_stamp: str | None) -> None:
        state = FILE_PARTIAL if received else FILE_PENDING
        with self._write() as db:
            db.execute("UPDATE files SET received = ?, crc32 = ?, part_stamp = ?, state = ?, updated = ? "
                       "WHERE key = ? AND state != ?",
                       (received, crc32, part_stamp, state, self._clock(), key, FILE_COMPLETE))

    def record_complete(self, key: str, crc32: int, digest: str) -> bool:
        """Mark a file complete; returns True if that made its job complete (exactly once)."""
        with self._write() as db:
            job_id = self._complete(db, key, crc32, digest, self._clock())
            return self._maybe_complete_job(db, job_id, self._clock())

    def record_complete_many(self, items: list[tuple[str, int, str]]) -> list[str]:
        """Mark many files complete in one transaction (a batch); returns the jobs that became complete."""
        now = self._clock()
        with self._write() as db:
            jobs = {self._complete(db, key, crc32, digest, now) for key, crc32, digest in items}
            return [job_id for job_id in sorted(jobs) if self._maybe_complete_job(db, job_id, now)]

    @staticmethod
    def _complete(db: sqlite3.Connection, key: str, crc32: int, digest: str, now: float) -> str:
        row = db.execute(f"SELECT {_FILE_COLS} FROM files WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise FiledockError(ErrorCode.UNKNOWN_FILE, "the file was deleted during the upload")
        record = FileRecord(*row)
        db.execute("UPDATE files SET state = ?, received = ?, crc32 = ?, digest = ?, uploaded_at = ?, "
                   "updated = ?, part_stamp = NULL WHERE key = ?",
                   (FILE_COMPLETE, record.size, crc32, digest, now, now, key))
        if record.replaces:  # a new version: it takes the old one's place in the same transaction
            db.execute("DELETE FROM files WHERE key = ?", (record.replaces,))
            db.execute("UPDATE files SET name = ? WHERE key = ?", (record.public_name, key))
        return record.job_id

    def _maybe_complete_job(self, db: sqlite3.Connection, job_id: str, now: float) -> bool:
        """A job whose files are all complete becomes complete, once, with its event in the outbox."""
        (left,) = db.execute(f"SELECT COUNT(*) FROM files WHERE job_id = ? AND state != ? AND {_VISIBLE}",
                             (job_id, FILE_COMPLETE)).fetchone()
        became = db.execute("UPDATE jobs SET state = ?, updated = ? WHERE id = ? AND state != ?",
                            (JOB_COMPLETE, now, job_id, JOB_COMPLETE)).rowcount if left == 0 else 0
        if became:
            self._add_event(db, job_id, "job.complete", now)
        return bool(became)

    def files_by_keys(self, keys: list[str]) -> list[FileRecord]:
        """The records of these keys (unknown keys are left out)."""
        out: list[FileRecord] = []
        for i in range(0, len(keys), 500):  # stay under SQLite's parameter limit
            part = keys[i:i + 500]
            out += [FileRecord(*r) for r in self._read(
                f"SELECT {_FILE_COLS} FROM files WHERE key IN ({','.join('?' * len(part))})", tuple(part))]
        return out

    def _add_event(self, db: sqlite3.Connection, job_id: str, kind: str, now: float) -> None:
        (name,) = db.execute("SELECT name FROM jobs WHERE id = ?", (job_id,)).fetchone()
        files = [{"name": r[0], "key": r[1], "size": r[2], "crc32": f"{r[3]:08x}", "digest": r[4]}
                 for r in db.execute("SELECT name, key, size, crc32, digest FROM files WHERE job_id = ? "
                                     "ORDER BY name", (job_id,))]
        event_id = new_key()
        payload = {"id": event_id, "type": kind, "job": {"id": job_id, "name": name}, "files": files,
                   "time": now}
        db.execute("INSERT INTO events (id, job_id, kind, payload, created) VALUES (?, ?, ?, ?, ?)",
                   (event_id, job_id, kind, json.dumps(payload), now))

    def reset_file(self, key: str, force: bool = False) -> None:
        """Back to pending with nothing received; a complete file only with ``force`` (fsck)."""
        with self._write() as db:
            db.execute("UPDATE files SET received = 0, crc32 = 0, state = ?, part_stamp = NULL, digest = NULL, "
                       "uploaded_at = NULL, updated = ? WHERE key = ? AND (state != ? OR ?)",
                       (FILE_PENDING, self._clock(), key, FILE_COMPLETE, force))
            if force:
                db.execute("UPDATE jobs SET state = ? WHERE id = (SELECT job_id FROM files WHERE key = ?)",
                           (JOB_OPEN, key))

    def all_files(self) -> list[FileRecord]:
        """Every file record (fsck)."""
        return [FileRecord(*r) for r in self._read(f"SELECT {_FILE_COLS} FROM files ORDER BY job_id, name")]

    def stale_partials(self, older_than: float) -> list[FileRecord]:
        return [FileRecord(*r) for r in self._read(
            f"SELECT {_FILE_COLS} FROM files WHERE state = ? AND updated < ?", (FILE_PARTIAL, older_than))]

    # ------------------------------------------------------------ sessions

    def open_session(self, job_id: str, ttl: float) -> Session:
        now = self._clock()
        session = Session(new_key(), job_id, now, now + ttl, None)
        with self._write() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise FiledockError(ErrorCode.NOT_FOUND, "no such job")
            db.execute(f"INSERT INTO sessions ({_SESSION_COLS}) VALUES (?, ?, ?, ?, ?)",
                       (session.key, job_id, now, session.expires, None))
        return session

    def get_session(self, key: str) -> Session | None:
        rows = self._read(f"SELECT {_SESSION_COLS} FROM sessions WHERE key = ?", (key,))
        return Session(*rows[0]) if rows else None

    def session_and_file(self, session_key: str, file_key: str) -> tuple[Session | None, FileRecord | None]:
        """Both records a data-port request needs, in one call (one trip to the store thread)."""
        with self._lock:
            srow = self._db.execute(f"SELECT {_SESSION_COLS} FROM sessions WHERE key = ?", (session_key,)).fetchone()
            frow = self._db.execute(f"SELECT {_FILE_COLS} FROM files WHERE key = ?", (file_key,)).fetchone()
        return (Session(*srow) if srow else None), (FileRecord(*frow) if frow else None)

    def close_session(self, key: str) -> Session | None:
        with self._write() as db:
            db.execute("UPDATE sessions SET closed = ? WHERE key = ? AND closed IS NULL", (self._clock(), key))
        return self.get_session(key)

    # ------------------------------------------------------------ outbox

    def pending_events(self, limit: int = 100) -> list[Event]:
        return [Event(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], tuple(json.loads(r[7])))
                for r in self._read(
                    "SELECT id, job_id, kind, payload, created, attempts, delivered, delivered_to FROM events "
                    "WHERE delivered IS NULL ORDER BY created LIMIT ?", (limit,))]

    def mark_event(self, event_id: str, delivered: bool, delivered_to: list[str] | None = None) -> None:
        """One delivery attempt: ``delivered`` when every target took it; ``delivered_to`` the ones that did."""
        with self._write() as db:
            if delivered_to is not None:
                db.execute("UPDATE events SET delivered_to = ? WHERE id = ?", (json.dumps(delivered_to), event_id))
            if delivered:
                db.execute("UPDATE events SET delivered = ?, attempts = attempts + 1 WHERE id = ?",
                           (self._clock(), event_id))
            else:
                db.execute("UPDATE events SET attempts = attempts + 1 WHERE id = ?", (event_id,))
