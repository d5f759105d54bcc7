"""All of filedock's SQL, for the embedded SQLite store (one file in the data dir).

Schema changes are numbered migrations applied in order at open; the version is
kept in ``schema_version``. Writes run in ``BEGIN IMMEDIATE`` transactions with
``synchronous=FULL``: once a method returns, what it wrote survives a crash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from filedock.durability import fsync_dir
from filedock.errors import ErrorCode, FiledockError
from filedock.digest import BLOCK_SIZE
from filedock.store.model import RANGED_STAMP
from filedock.store.model import (
    FILE_COMPLETE, FILE_PARTIAL, FILE_PENDING, JOB_COMPLETE, JOB_OPEN, SCOPE_ADMIN, SCOPES, Event, FileRecord,
    Job, Session, TokenGrant, replacement_name,
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
    # 3: scoped tokens (admin, upload, read; optionally one job), and sessions carry their token's scope
    """
    ALTER TABLE tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin';
    ALTER TABLE tokens ADD COLUMN job_id TEXT REFERENCES jobs(id) ON DELETE CASCADE;
    ALTER TABLE sessions ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin'
    """,
    # 4: no live key in clear. Sessions keep the SHA-256 of their key. A file is named by a stable id
    # (its blobs' name on disk; for files made before, the old key, which stops being a key); its key
    # is derived from the id with a secret kept outside the database, and found by its SHA-256
    # (filled in at open, see _rekey_files). Event payloads name files by id from now on.
    """
    UPDATE sessions SET key = filedock_sha256(key);
    ALTER TABLE sessions RENAME COLUMN key TO key_hash;
    ALTER TABLE files RENAME COLUMN key TO id;
    ALTER TABLE files ADD COLUMN key_hash TEXT;
    CREATE UNIQUE INDEX files_key_hash ON files(key_hash);
    CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)
    """,
    # 5: each job's file counts and byte sums, kept by triggers as files change, so that a dashboard's
    # poll reads one row per job on screen instead of every file of every job
    """
    CREATE TABLE job_counts (
        job_id TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
        files INTEGER NOT NULL DEFAULT 0,
        complete INTEGER NOT NULL DEFAULT 0,
        bytes_total INTEGER NOT NULL DEFAULT 0,
        bytes_received INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO job_counts (job_id, files, complete, bytes_total, bytes_received)
        SELECT jobs.id, COUNT(files.id), COALESCE(SUM(files.state = 'complete'), 0),
               COALESCE(SUM(files.size), 0), COALESCE(SUM(files.received), 0)
        FROM jobs LEFT JOIN files ON files.job_id = jobs.id GROUP BY jobs.id;
    CREATE INDEX jobs_created ON jobs(created);
    CREATE TRIGGER job_counts_new_job AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts (job_id) VALUES (NEW.id);
    END;
    CREATE TRIGGER job_counts_file_added AFTER INSERT ON files BEGIN
        UPDATE job_counts SET files = files + 1, complete = complete + (NEW.state = 'complete'),
            bytes_total = bytes_total + NEW.size, bytes_received = bytes_received + NEW.received
        WHERE job_id = NEW.job_id;
    END;
    CREATE TRIGGER job_counts_file_removed AFTER DELETE ON files BEGIN
        UPDATE job_counts SET files = files - 1, complete = complete - (OLD.state = 'complete'),
            bytes_total = bytes_total - OLD.size, bytes_received = bytes_received - OLD.received
        WHERE job_id = OLD.job_id;
    END;
    CREATE TRIGGER job_counts_file_changed AFTER UPDATE OF job_id, state, size, received ON files BEGIN
        UPDATE job_counts SET files = files - 1, complete = complete - (OLD.state = 'complete'),
            bytes_total = bytes_total - OLD.size, bytes_received = bytes_received - OLD.received
        WHERE job_id = OLD.job_id;
        UPDATE job_counts SET files = files + 1, complete = complete + (NEW.state = 'complete'),
            bytes_total = bytes_total + NEW.size, bytes_received = bytes_received + NEW.received
        WHERE job_id = NEW.job_id;
    END
    """,
    # 6: ranged uploads (FILEDOCK/1 PUTR): the blocks of a file held durably, each with its content
    # hash and CRC-32, so a resume learns every durable range (not just a prefix) and completion
    # builds the file's digest and CRC from them; the file's part_stamp says 'ranged' meanwhile
    """
    CREATE TABLE range_blocks (
        file_id TEXT NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        block INTEGER NOT NULL,
        hash TEXT NOT NULL,
        crc32 INTEGER NOT NULL,
        PRIMARY KEY (file_id, block)
    )
    """,
    # 7: HTTP uploads (tus). Parts of a concatenation (names starting with PART_MARK, char(2)) are hidden
    # file records: the job's counts leave them out, so that a final file and the parts it is made of are
    # never counted twice. A file whose length is deferred (creation-defer-length) has size 0 until a
    # PATCH tells it; a final upload keeps the Upload-Concat it was made with, to report it.
    """
    ALTER TABLE files ADD COLUMN length_deferred INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE files ADD COLUMN upload_concat TEXT;
    DROP TRIGGER job_counts_file_added;
    DROP TRIGGER job_counts_file_removed;
    DROP TRIGGER job_counts_file_changed;
    CREATE TRIGGER job_counts_file_added AFTER INSERT ON files WHEN substr(NEW.name, 1, 1) != char(2) BEGIN
        UPDATE job_counts SET files = files + 1, complete = complete + (NEW.state = 'complete'),
            bytes_total = bytes_total + NEW.size, bytes_received = bytes_received + NEW.received
        WHERE job_id = NEW.job_id;
    END;
    CREATE TRIGGER job_counts_file_removed AFTER DELETE ON files WHEN substr(OLD.name, 1, 1) != char(2) BEGIN
        UPDATE job_counts SET files = files - 1, complete = complete - (OLD.state = 'complete'),
            bytes_total = bytes_total - OLD.size, bytes_received = bytes_received - OLD.received
        WHERE job_id = OLD.job_id;
    END;
    CREATE TRIGGER job_counts_file_changed AFTER UPDATE OF job_id, state, size, received ON files
        WHEN substr(NEW.name, 1, 1) != char(2) BEGIN
        UPDATE job_counts SET files = files - 1, complete = complete - (OLD.state = 'complete'),
            bytes_total = bytes_total - OLD.size, bytes_received = bytes_received - OLD.received
        WHERE job_id = OLD.job_id;
        UPDATE job_counts SET files = files + 1, complete = complete + (NEW.state = 'complete'),
            bytes_total = bytes_total + NEW.size, bytes_received = bytes_received + NEW.received
        WHERE job_id = NEW.job_id;
    END
    """,
]

KEYS_HASHED_VERSION = 4
"""The schema version from which no session or file key is stored in clear."""


def sql_statements(script: str) -> Iterator[str]:
    """A migration's statements, one by one (a trigger's body keeps its inner semicolons)."""
    statement = ""
    for piece in script.split(";"):
        statement += piece + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \n;"):
                yield statement
            statement = ""
    if statement.strip(" \n;"):
        yield statement


_FILE_COLS = "id, job_id, name, size, received, state, crc32, digest, uploaded_at, updated, part_stamp"
_VISIBLE = "substr(name, 1, 1) NOT IN (char(1), char(2))"
"""Not a new version waiting to replace a file (``REPLACEMENT_MARK``) nor a concatenation part
(``PART_MARK``): what listings and job states count."""
_NOT_PART = "substr(name, 1, 1) != char(2)"
_PART = "substr(name, 1, 1) = char(2)"
_JOB_COLS = "id, name, metadata, created, updated, state"
_SESSION_COLS = "key_hash, job_id, created, expires, closed, scope"
_TOKEN_COLS = "hash, label, scope, job_id, created"
TOKEN_ID_LENGTH = 16
"""Hex digits of a token's SHA-256 that name it (``TokenGrant.id``)."""


def _disk_full(exc: sqlite3.OperationalError) -> Exception:
    """SQLite's "database or disk is full" as the stable ``no-space`` error every caller
    (data port and API alike) can answer with; any other error is returned as it is."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
        return FiledockError(ErrorCode.NO_SPACE, "the server's disk is full; nothing was changed, retry later")
    return exc


def hash_token(token: str) -> str:
    """Tokens are stored as their SHA-256: a stolen database grants nothing."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A session key, job id or file id: a UUID4, 122 random bits from the OS."""
    return str(uuid.uuid4())


def hash_key(key: str) -> str:
    """Session and file keys are stored as their SHA-256 too: 122 random bits need no slow hash."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


SECRET_SUFFIX = ".secret"
"""The file key secret lives next to the database, as ``<database name without suffix>.secret``."""


SECRET_BYTES = 32
"""The length of the file key secret."""


def load_secret(path: Path) -> bytes:
    """The 32-byte secret file keys are derived with, made (owner-only) if there is none."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = None
    if text is not None:
        # a short (or empty) secret would make every file key guessable: refuse rather than use it
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"{path} does not hold a {SECRET_BYTES}-byte secret ({2 * SECRET_BYTES} hex digits); "
                             f"restore it from a backup, or delete it to make a new one (which changes every "
                             f"file key, see docs/deploy.md)")
        return secret
    secret = secrets.token_bytes(SECRET_BYTES)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(secret.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return secret


def _create_owner_only(path: Path) -> None:
    """Create an empty database file, 0600, unless there is one. An existing one is never opened
    here: closing any descriptor of it would drop the POSIX locks SQLite holds on it in this process."""
    if path.exists():
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _owner_only(path: Path) -> None:
    """Make a database file that exists owner-only (older versions made it 0644)."""
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass


class SQLiteStore:
    """``MetadataStore`` on one SQLite file. Safe to call from one thread at a time."""

    def __init__(self, path: str | Path, clock=time.time, secret: bytes | None = None) -> None:
        """Open (creating and migrating) the database at ``path``, owner-only.

        File keys are derived with ``secret``; by default it is read from (or made in)
        ``<path without suffix>.secret``, a file apart from the database, so that a copy
        of the database alone grants nothing.
        """
        self.path = str(path)
        self._clock = clock
        self._lock = threading.Lock()
        db_path = Path(path)
        _create_owner_only(db_path)  # SQLite's -wal and -shm files take the database's mode
        for name in (db_path.name, db_path.name + "-wal", db_path.name + "-shm"):
            _owner_only(db_path.with_name(name))
        self._secret = secret if secret is not None else load_secret(db_path.with_suffix(SECRET_SUFFIX))
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.create_function("filedock_sha256", 1, hash_key, deterministic=True)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute("PRAGMA secure_delete=ON")  # what a key's hash replaces is overwritten, not left in free pages
        before = self.schema_version()
        self.migrate()
        self._rekey_files()
        if before < KEYS_HASHED_VERSION <= self.schema_version():
            self._scrub()

    # ------------------------------------------------------------ file keys

    def file_key(self, file_id: str) -> str:
        """The key of file ``file_id``: a UUID4 made of an HMAC of the id under the secret.

        It can be shown again (in listings, in events) without being stored anywhere.
        """
        mac = hmac.new(self._secret, b"filedock file key\0" + file_id.encode("ascii"), hashlib.sha256).digest()
        return str(uuid.UUID(bytes=mac[:16], version=4))

    def _rekey_files(self) -> None:
        """Fill in the key hashes the secret in use gives, if it is not the one they were made with
        (the first open after migration 4, or a secret deleted to change every file key)."""
        mark = hashlib.sha256(b"filedock secret mark\0" + self._secret).hexdigest()[:32]
        if self.schema_version() < KEYS_HASHED_VERSION:  # a test pinning an older schema
            return
        if self._read("SELECT 1 FROM settings WHERE name = 'file_key_secret' AND value = ?", (mark,)):
            return  # the usual case: no write lock taken (fsck or `token create` next to a live server)
        with self._write() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM files")]
            db.execute("UPDATE files SET key_hash = NULL")
            db.executemany("UPDATE files SET key_hash = ? WHERE id = ?",
                           [(hash_key(self.file_key(i)), i) for i in ids])
            db.execute("INSERT OR REPLACE INTO settings VALUES ('file_key_secret', ?)", (mark,))

    def _scrub(self) -> None:
        """Leave no copy of the keys migration 4 replaced: not in the WAL, not in a free page."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _file(self, row: tuple) -> FileRecord:
        record = FileRecord(self.file_key(row[0]), *row[1:], id=row[0])
        return replace(record, replaces_key=self.file_key(record.replaces)) if record.replaces else record

    # ------------------------------------------------------------ plumbing

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise _disk_full(exc) from exc
            try:
                yield self._db
                self._db.execute("COMMIT")  # a full disk may refuse the commit itself
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise _disk_full(exc) from exc
                raise

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                raise _disk_full(exc) from exc

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
                    for statement in sql_statements(script):
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

    def create_token(self, label: str, scope: str = SCOPE_ADMIN, job_id: str | None = None) -> str:
        """A new token (shown this once: only its hash is kept) with ``scope``, for one job if ``job_id``."""
        if scope not in SCOPES:
            raise FiledockError(ErrorCode.BAD_REQUEST, f"a scope is one of {', '.join(SCOPES)}")
        token = "fdk_" + secrets.token_urlsafe(32)
        with self._write() as db:
            if job_id is not None and db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise FiledockError(ErrorCode.NOT_FOUND, "no such job")
            db.execute(f"INSERT INTO tokens ({_TOKEN_COLS}) VALUES (?, ?, ?, ?, ?)",
                       (hash_token(token), label, scope, job_id, self._clock()))
        return token

    @staticmethod
    def _grant(row: tuple) -> TokenGrant:
        return TokenGrant(row[0][:TOKEN_ID_LENGTH], row[1], row[2], row[3], row[4])

    def check_token(self, token: str) -> TokenGrant | None:
        """What ``token`` grants, or None for a token the store does not know."""
        rows = self._read(f"SELECT {_TOKEN_COLS} FROM tokens WHERE hash = ?", (hash_token(token),))
        return self._grant(rows[0]) if rows else None

    def list_tokens(self) -> list[TokenGrant]:
        """Every token's grant, oldest first (never the tokens themselves: they are not kept)."""
        return [self._grant(r) for r in self._read(f"SELECT {_TOKEN_COLS} FROM tokens ORDER BY created")]

    def revoke_token(self, token_id: str) -> bool:
        """Delete the token named ``token_id`` (see ``TokenGrant.id``); False if there is none."""
        if len(token_id) != TOKEN_ID_LENGTH or any(c not in "0123456789abcdef" for c in token_id):
            return False
        with self._write() as db:
            return db.execute("DELETE FROM tokens WHERE substr(hash, 1, ?) = ?",
                              (TOKEN_ID_LENGTH, token_id)).rowcount > 0

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
            files = [self._file(r) for r in db.execute(
                f"SELECT {_FILE_COLS} FROM files WHERE job_id = ?", (job_id,)).fetchall()]
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return files

    # ------------------------------------------------------------ summaries (what a dashboard polls)

    def change_count(self) -> int:
        """A number that grows with every row this store changes (an ``ETag`` for polls).

        Counted by this connection, so it starts again at each open: callers pair it with
        something that differs per process.
        """
        with self._lock:
            return self._db.total_changes

    def job_summaries(self, limit: int, offset: int = 0) -> list[tuple[Job, int, int, int, int]]:
        """Jobs in creation order, a page of them, each with (files, complete files, bytes declared,
        bytes received) from the counts the triggers keep: the cost is the page's, whatever the files."""
        rows = self._read(
            f"SELECT {', '.join('j.' + c.strip() for c in _JOB_COLS.split(','))}, COALESCE(c.files, 0), "
            "COALESCE(c.complete, 0), COALESCE(c.bytes_total, 0), COALESCE(c.bytes_received, 0) "
            "FROM jobs AS j LEFT JOIN job_counts AS c ON c.job_id = j.id ORDER BY j.created, j.rowid LIMIT ? OFFSET ?",
            (limit, offset))
        return [(self._job(r[:6]), r[6], r[7], r[8], r[9]) for r in rows]

    def job_counts(self, job_id: str) -> tuple[int, int, int, int]:
        """One job's (files, complete files, bytes declared, bytes received), as the triggers keep them."""
        rows = self._read("SELECT files, complete, bytes_total, bytes_received FROM job_counts WHERE job_id = ?",
                          (job_id,))
        return tuple(rows[0]) if rows else (0, 0, 0, 0)

    def count_jobs(self) -> int:
        """How many jobs there are."""
        return self._read("SELECT COUNT(*) FROM jobs")[0][0]

    def files_page(self, job_id: str, limit: int, offset: int = 0) -> list[FileRecord]:
        """A page of a job's files in name order (``list_files`` is every one of them)."""
        return [self._file(r) for r in self._read(
            f"SELECT {_FILE_COLS} FROM files WHERE job_id = ? AND {_VISIBLE} ORDER BY name LIMIT ? OFFSET ?",
            (job_id, limit, offset))]

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
        ids = [new_key() for _ in entries]
        records = [FileRecord(self.file_key(i), job_id, name, size, 0, FILE_PENDING, 0, None, None, now, id=i)
                   for i, (name, size) in zip(ids, entries)]
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
                new_ids = {r.id for r in records}
                records = [self._new_version(db, r) if r.name in replace else r for r in records]
                fresh = [r for r in records if r.id in new_ids]  # not a waiting version returned again
                db.executemany(f"INSERT INTO files ({_FILE_COLS}, key_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                               [(r.id, job_id, r.name, r.size, 0, FILE_PENDING, 0, None, None, now, None,
                                 hash_key(r.key)) for r in fresh])
                if any(not r.replaces and not r.is_part for r in fresh):  # a hidden record never reopens its job
                    db.execute("UPDATE jobs SET state = ?, updated = ? WHERE id = ?", (JOB_OPEN, now, job_id))
        except sqlite3.IntegrityError:
            names = ", ".join(repr(n) for n, _ in entries[:3])
            raise FiledockError(ErrorCode.CONFLICT, f"the job has a file named {names} already"
                                if len(entries) == 1 else f"the job has one of these files already: {names}...") \
                from None
        return records

    def _new_version(self, db: sqlite3.Connection, record: FileRecord) -> FileRecord:
        """``record`` as a new version of the job's file of its name (``add_files(replace=...)``)."""
        old = db.execute("SELECT id FROM files WHERE job_id = ? AND name = ?",
                         (record.job_id, record.name)).fetchone()
        if old is None:
            return record  # nothing to replace: a plain declaration
        row = db.execute(f"SELECT {_FILE_COLS} FROM files WHERE job_id = ? AND name = ?",
                         (record.job_id, replacement_name(old[0], record.name))).fetchone()
        if row is not None:
            waiting = self._file(row)
            if waiting.size != record.size:
                db.execute("UPDATE files SET size = ?, received = 0, crc32 = 0, part_stamp = NULL, state = ?, "
                           "updated = ? WHERE id = ?", (record.size, FILE_PENDING, self._clock(), waiting.id))
                return replace(waiting, size=record.size, received=0, crc32=0, part_stamp=None,
                               state=FILE_PENDING, updated=self._clock())
            return waiting
        return replace(record, name=replacement_name(old[0], record.name), replaces_key=self.file_key(old[0]))

    def list_files(self, job_id: str) -> list[FileRecord]:
        """The job's files by name (new versions still waiting to replace one are left out)."""
        return [self._file(r) for r in self._read(
            f"SELECT {_FILE_COLS} FROM files WHERE job_id = ? AND {_VISIBLE} ORDER BY name", (job_id,))]

    def get_file(self, key: str) -> FileRecord | None:
        rows = self._read(f"SELECT {_FILE_COLS} FROM files WHERE key_hash = ?", (hash_key(key),))
        return self._file(rows[0]) if rows else None

    def record_progress(self, key: str, received: int, crc32: int, part_stamp: str | None) -> None:
        state = FILE_PARTIAL if received else FILE_PENDING
        with self._write() as db:
            db.execute("UPDATE files SET received = ?, crc32 = ?, part_stamp = ?, state = ?, updated = ? "
                       "WHERE key_hash = ? AND state != ?",
                       (received, crc32, part_stamp, state, self._clock(), hash_key(key), FILE_COMPLETE))

    def record_complete(self, key: str, crc32: int, digest: str) -> bool:
        """Mark a file complete; returns True if that made its job complete (exactly once)."""
        with self._write() as db:
            job_id = self._complete(db, key, crc32, digest, self._clock())
            return job_id is not None and self._maybe_complete_job(db, job_id, self._clock())

    def record_complete_many(self, items: list[tuple[str, int, str]]) -> list[str]:
        """Mark many files complete in one transaction (a batch); returns the jobs that became complete."""
        now = self._clock()
        with self._write() as db:
            jobs = {self._complete(db, key, crc32, digest, now) for key, crc32, digest in items} - {None}
            return [job_id for job_id in sorted(jobs) if self._maybe_complete_job(db, job_id, now)]

    @staticmethod
    def _complete(db: sqlite3.Connection, key: str, crc32: int, digest: str, now: float) -> str | None:
        """Mark one file complete; returns its job, or None for a concatenation part (which never
        completes its job: the final file made of it does)."""
        row = db.execute(f"SELECT {_FILE_COLS} FROM files WHERE key_hash = ?", (hash_key(key),)).fetchone()
        if row is None:
            raise FiledockError(ErrorCode.GONE, "the file was deleted during the upload")
        record = FileRecord(key, *row[1:], id=row[0])
        db.execute("UPDATE files SET state = ?, received = ?, crc32 = ?, digest = ?, uploaded_at = ?, "
                   "updated = ?, part_stamp = NULL WHERE id = ?",
                   (FILE_COMPLETE, record.size, crc32, digest, now, now, record.id))
        if record.replaces:  # a new version: it takes the old one's place in the same transaction
            db.execute("DELETE FROM files WHERE id = ?", (record.replaces,))
            db.execute("UPDATE files SET name = ? WHERE id = ?", (record.public_name, record.id))
        return None if record.is_part else record.job_id

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
            part = [hash_key(key) for key in keys[i:i + 500]]
            out += [self._file(r) for r in self._read(
                f"SELECT {_FILE_COLS} FROM files WHERE key_hash IN ({','.join('?' * len(part))})", tuple(part))]
        return out

    def _add_event(self, db: sqlite3.Connection, job_id: str, kind: str, now: float) -> None:
        (name,) = db.execute("SELECT name FROM jobs WHERE id = ?", (job_id,)).fetchone()
        # stored with file ids, never keys: pending_events derives each key when it hands the event out
        files = [{"name": r[0], "id": r[1], "size": r[2], "crc32": f"{r[3]:08x}", "digest": r[4]}
                 for r in db.execute(f"SELECT name, id, size, crc32, digest FROM files WHERE job_id = ? "
                                     f"AND {_NOT_PART} ORDER BY name", (job_id,))]
        event_id = new_key()
        payload = {"id": event_id, "type": kind, "job": {"id": job_id, "name": name}, "files": files,
                   "time": now}
        db.execute("INSERT INTO events (id, job_id, kind, payload, created) VALUES (?, ?, ?, ?, ?)",
                   (event_id, job_id, kind, json.dumps(payload), now))

    def record_range_blocks(self, key: str, blocks: list[tuple[int, str, int]]) -> None:
        """Blocks of a ranged upload are durable on disk: record them (index, hash hex, CRC-32), mark
        the file's progress as ranged and count its durable bytes in ``received``."""
        with self._write() as db:
            row = db.execute("SELECT id FROM files WHERE key_hash = ? AND state != ?",
                             (hash_key(key), FILE_COMPLETE)).fetchone()
            if row is None:
                return
            db.executemany("INSERT OR REPLACE INTO range_blocks (file_id, block, hash, crc32) VALUES (?, ?, ?, ?)",
                           [(row[0], i, h, c) for i, h, c in blocks])
            db.execute("UPDATE files SET part_stamp = ?, state = ?, updated = ?, received = (SELECT "
                       "COALESCE(SUM(MIN(files.size - block * ?, ?)), 0) FROM range_blocks WHERE file_id = files.id) "
                       "WHERE id = ?", (RANGED_STAMP, FILE_PARTIAL, self._clock(), BLOCK_SIZE, BLOCK_SIZE, row[0]))

    def range_blocks(self, key: str) -> list[tuple[int, str, int]]:
        """The durable blocks of a ranged upload: (index, hash hex, CRC-32), by index."""
        return [tuple(r) for r in self._read(
            "SELECT block, hash, crc32 FROM range_blocks WHERE file_id = (SELECT id FROM files WHERE key_hash = ?) "
            "ORDER BY block", (hash_key(key),))]

    def reset_file(self, key: str, force: bool = False) -> None:
        """Back to pending with nothing received; a complete file only with ``force`` (fsck)."""
        with self._write() as db:
            db.execute("DELETE FROM range_blocks WHERE file_id = (SELECT id FROM files WHERE key_hash = ?)",
                       (hash_key(key),))
            db.execute("UPDATE files SET received = 0, crc32 = 0, state = ?, part_stamp = NULL, digest = NULL, "
                       "uploaded_at = NULL, updated = ? WHERE key_hash = ? AND (state != ? OR ?)",
                       (FILE_PENDING, self._clock(), hash_key(key), FILE_COMPLETE, force))
            if force:
                db.execute("UPDATE jobs SET state = ? WHERE id = (SELECT job_id FROM files WHERE key_hash = ?)",
                           (JOB_OPEN, hash_key(key)))

    def delete_file(self, key: str) -> bool:
        """Forget a file that is not complete (an HTTP upload terminated by its client); False if there
        is no such unfinished file."""
        with self._write() as db:
            cur = db.execute("DELETE FROM files WHERE key_hash = ? AND state != ?", (hash_key(key), FILE_COMPLETE))
            return cur.rowcount > 0

    def set_upload_info(self, key: str, length_deferred: bool, upload_concat: str | None) -> None:
        """What an HTTP upload's file record needs besides the usual: its length deferred (its size
        stays 0 until ``declare_length``), or the ``Upload-Concat`` of a final upload."""
        with self._write() as db:
            db.execute("UPDATE files SET length_deferred = ?, upload_concat = ? WHERE key_hash = ?",
                       (int(length_deferred), upload_concat, hash_key(key)))

    def upload_info(self, key: str) -> tuple[bool, str | None]:
        """(length deferred, ``Upload-Concat``) of a file; (False, None) for an unknown one."""
        rows = self._read("SELECT length_deferred, upload_concat FROM files WHERE key_hash = ?", (hash_key(key),))
        return (bool(rows[0][0]), rows[0][1]) if rows else (False, None)

    def declare_length(self, key: str, size: int, quota: int | None = None) -> FileRecord:
        """The length of a file whose length was deferred, checked against the job's ``quota`` now that
        it is known (``quota-exceeded``: nothing changed). A file whose length is known already: the
        same length is no change, another is ``size-mismatch``."""
        with self._write() as db:
            row = db.execute(f"SELECT {_FILE_COLS}, length_deferred FROM files WHERE key_hash = ?",
                             (hash_key(key),)).fetchone()
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
                (used,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM files WHERE job_id = ?",
                                     (record.job_id,)).fetchone()
                if used + size > quota:
                    raise FiledockError(ErrorCode.QUOTA_EXCEEDED,
                                        f"job quota is {quota} bytes; {used} are declared already")
            db.execute("UPDATE files SET size = ?, length_deferred = 0 WHERE id = ?", (size, record.id))
        return replace(record, size=size)

    def delete_parts(self, keys: list[str]) -> int:
        """Forget concatenation parts (complete or not): the final made of them is complete, or they
        were abandoned. Other records are never touched; returns how many went."""
        with self._write() as db:
            return sum(db.execute(f"DELETE FROM files WHERE key_hash = ? AND {_PART}", (hash_key(key),)).rowcount
                       for key in keys)

    def stale_parts(self, older_than: float) -> list[FileRecord]:
        """Concatenation parts untouched since ``older_than`` (complete or not): abandoned, the sweeper's."""
        return [self._file(r) for r in self._read(
            f"SELECT {_FILE_COLS} FROM files WHERE {_PART} AND updated < ?", (older_than,))]

    def all_files(self) -> list[FileRecord]:
        """Every file record (fsck)."""
        return [self._file(r) for r in self._read(f"SELECT {_FILE_COLS} FROM files ORDER BY job_id, name")]

    def unfinished_files(self) -> list[FileRecord]:
        """Every file not complete (the start-up check for complete files never recorded)."""
        return [self._file(r) for r in self._read(f"SELECT {_FILE_COLS} FROM files WHERE state != ?",
                                                   (FILE_COMPLETE,))]

    def stale_partials(self, older_than: float) -> list[FileRecord]:
        return [self._file(r) for r in self._read(
            f"SELECT {_FILE_COLS} FROM files WHERE state = ? AND updated < ? AND {_NOT_PART}",
            (FILE_PARTIAL, older_than))]

    # ------------------------------------------------------------ sessions

    def open_session(self, job_id: str, ttl: float, scope: str = SCOPE_ADMIN) -> Session:
        now = self._clock()
        session = Session(new_key(), job_id, now, now + ttl, None, scope)
        with self._write() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise FiledockError(ErrorCode.NOT_FOUND, "no such job")
            db.execute(f"INSERT INTO sessions ({_SESSION_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                       (hash_key(session.key), job_id, now, session.expires, None, scope))
        return session  # the one time the key itself is at hand

    def get_session(self, key: str) -> Session | None:
        """The session of ``key`` (the record carries ``key`` as given: only its hash is stored)."""
        rows = self._read(f"SELECT {_SESSION_COLS} FROM sessions WHERE key_hash = ?", (hash_key(key),))
        return Session(key, *rows[0][1:]) if rows else None

    def session_and_file(self, session_key: str, file_key: str) -> tuple[Session | None, FileRecord | None]:
        """Both records a data-port request needs, in one call (one trip to the store thread)."""
        with self._lock:
            srow = self._db.execute(f"SELECT {_SESSION_COLS} FROM sessions WHERE key_hash = ?",
                                    (hash_key(session_key),)).fetchone()
            frow = self._db.execute(f"SELECT {_FILE_COLS} FROM files WHERE key_hash = ?",
                                    (hash_key(file_key),)).fetchone()
        return (Session(session_key, *srow[1:]) if srow else None), (self._file(frow) if frow else None)

    def close_session(self, key: str) -> Session | None:
        with self._write() as db:
            db.execute("UPDATE sessions SET closed = ? WHERE key_hash = ? AND closed IS NULL",
                       (self._clock(), hash_key(key)))
        return self.get_session(key)

    # ------------------------------------------------------------ outbox

    def _with_keys(self, payload: dict[str, Any]) -> dict[str, Any]:
        """An event payload as delivered: each file with its key (stored by id; events stored before
        migration 4 name the id ``key``)."""
        for entry in payload.get("files", []):
            entry["key"] = self.file_key(entry.pop("id", None) or entry["key"])
        return payload

    def pending_events(self, limit: int = 100) -> list[Event]:
        return [Event(r[0], r[1], r[2], self._with_keys(json.loads(r[3])), r[4], r[5], r[6], tuple(json.loads(r[7])))
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
