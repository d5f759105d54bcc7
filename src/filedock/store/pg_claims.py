"""The SQL of the shared upload registry: which server holds which file, in PostgreSQL.

Two tables, made at start (``CREATE ... IF NOT EXISTS`` under a transaction-level
advisory lock, so servers starting at once do not race on the catalogue):

- ``registry_servers``: one row per running server process, with its lease
  (``lease_until``, renewed by every heartbeat), the number of the session-level
  advisory lock its listening connection holds while it lives, and the bytes its
  uploads have promised to write (``promised``).
- ``upload_claims``: one row per file held, naming the holder's ``server_id`` and a
  random ``claim_id`` (so a late release never deletes a newer claim of the same file).
  The file is named by the SHA-256 of its key: the key opens the file, so it is
  never stored in clear.
- ``upload_range_claims``: one row per byte range of a file held by a ranged upload
  (``PUTR``), keyed by (file, range start), with the range's end, holder and claim id.
  Ranges of one file that do not overlap are held at once, by one server or several;
  a claim of the whole file (a plain ``PUT``) and range claims of the same file
  exclude each other, as in the in-process registry. Every claim of a file (whole or
  range, single or batch) is taken under a transaction-level advisory lock on the file,
  so two servers checking each other's table at once cannot both be granted.

A server is alive while its lease has not run out AND its advisory lock is held:
a SIGKILLed server's connections are closed by its kernel, PostgreSQL drops the
lock at once, and its claims are free at the next try; a server that hangs or
loses the network keeps the lock until TCP notices, so the lease bounds that case.

Everything here is blocking (psycopg 3, autocommit connections): the registry runs
it in its own threads.
"""

from __future__ import annotations

import hashlib
import secrets

import psycopg
from psycopg import sql

LOCK_CLASS = 0x46444B  # the first key of every advisory lock the registry takes ("FDK")
SCHEMA_LOCK = 1  # second key of the lock that serialises schema creation
FILE_LOCK_CLASS = LOCK_CLASS + 1  # first key of a file's claim lock (the second: hashtext of its hash)
COMPLETION_LOCK_CLASS = LOCK_CLASS + 2  # first key of a ranged file's completion lock (one server completes it)

SCHEMA = """
CREATE TABLE IF NOT EXISTS registry_servers (
    server_id   text PRIMARY KEY,
    lock_id     integer NOT NULL,
    lease_until timestamptz NOT NULL,
    promised    bigint NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    label       text NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS upload_claims (
    file_hash  text PRIMARY KEY,
    server_id  text NOT NULL REFERENCES registry_servers ON DELETE CASCADE,
    claim_id   bigint NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS upload_claims_server ON upload_claims (server_id);
CREATE TABLE IF NOT EXISTS upload_range_claims (
    file_hash   text NOT NULL,
    range_start bigint NOT NULL,
    range_end   bigint NOT NULL,
    server_id   text NOT NULL REFERENCES registry_servers ON DELETE CASCADE,
    claim_id    bigint NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (file_hash, range_start)
);
CREATE INDEX IF NOT EXISTS upload_range_claims_server ON upload_range_claims (server_id);
"""

# the holder of a claim is alive: its lease runs and its listening connection holds its lock
_ALIVE = """
EXISTS (SELECT 1 FROM registry_servers s
          JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                         AND l.classid = {lock_class} AND l.objid = s.lock_id
                         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
         WHERE s.server_id = {holder} AND s.lease_until > now())
"""


def file_hash(file_key: str) -> str:
    """What the registry calls a file: the SHA-256 of its key (the key itself opens the file)."""
    return hashlib.sha256(file_key.encode()).hexdigest()


def channel_name(server_id: str) -> str:
    """The LISTEN/NOTIFY channel of one server (release requests in, release news out)."""
    return f"filedock_registry_{server_id}"


def new_claim_id() -> int:
    """A random id for one claim (63 bits: a bigint)."""
    return secrets.randbits(63)


def connect(dsn: str) -> psycopg.Connection:
    """An autocommit connection (each statement is its own transaction; all are short)."""
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


def create_schema(conn: psycopg.Connection) -> None:
    """Make the tables if they are missing; safe with several servers starting at once."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, SCHEMA_LOCK))
        conn.execute(SCHEMA)


def register_server(conn: psycopg.Connection, server_id: str, lease_seconds: float, label: str,
                    lock_id: int | None = None) -> int:
    """Take a free advisory lock for this server on ``conn`` (kept for the connection's life; or say
    that ``lock_id``, taken on it before, is still ours) and write its row with a fresh lease;
    returns the lock's number."""
    while lock_id is None:
        candidate = secrets.randbelow(2**31 - 2) + 2  # 1 is the schema lock
        if conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, candidate)).fetchone()[0]:
            lock_id = candidate
    conn.execute("INSERT INTO registry_servers (server_id, lock_id, lease_until, label) "
                 "VALUES (%s, %s, now() + make_interval(secs => %s), %s) "
                 "ON CONFLICT (server_id) DO UPDATE SET lock_id = excluded.lock_id, lease_until = excluded.lease_until",
                 (server_id, lock_id, lease_seconds, label))
    return lock_id


def listen(conn: psycopg.Connection, server_id: str) -> None:
    """Receive this server's notifications on ``conn``."""
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel_name(server_id))))


def renew_lease(conn: psycopg.Connection, server_id: str, lease_seconds: float, promised: int,
                live_claims: list[int], list_age: float) -> tuple[bool, int]:
    """One heartbeat: extend the lease, publish ``promised``, drop claims of ours that nobody holds
    any more (a release whose DELETE failed): those not in ``live_claims``, a list made at most
    ``list_age`` seconds ago. Returns (lease still ours, bytes the other live
    servers promised)."""
    with conn.transaction():
        row = conn.execute("UPDATE registry_servers SET lease_until = now() + make_interval(secs => %s), "
                           "promised = %s WHERE server_id = %s AND lease_until > now() RETURNING 1",
                           (lease_seconds, promised, server_id)).fetchone()
        if row is None:
            return False, 0
        # only rows older than the list can be: a claim taken since it was made is not in it
        for table in ("upload_claims", "upload_range_claims"):
            conn.execute(f"DELETE FROM {table} WHERE server_id = %s AND NOT (claim_id = ANY(%s)) "
                         "AND claimed_at < now() - make_interval(secs => %s)", (server_id, live_claims, list_age))
        others = conn.execute("SELECT coalesce(sum(promised), 0) FROM registry_servers s WHERE s.server_id <> %s AND "
                              + _ALIVE.format(lock_class=LOCK_CLASS, holder="s.server_id"),
                              (server_id,)).fetchone()[0]
    return True, int(others)


def forget_dead_servers(conn: psycopg.Connection, older_than_seconds: float) -> int:
    """Delete the rows (and, by cascade, the claims) of servers whose lease ran out long ago."""
    cur = conn.execute("DELETE FROM registry_servers WHERE lease_until < now() - make_interval(secs => %s)",
                       (older_than_seconds,))
    return cur.rowcount


def unregister_server(conn: psycopg.Connection, server_id: str) -> None:
    """A clean stop: the server's row and every claim it still had go."""
    conn.execute("DELETE FROM registry_servers WHERE server_id = %s", (server_id,))


def _lock_file(conn: psycopg.Connection, hashed: str) -> None:
    """Inside a transaction: no other claim of this file is taken until it commits."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (FILE_LOCK_CLASS, hashed))


# live range claims of another server on a file (all of them, or those overlapping a range)
_OTHERS_RANGES = ("SELECT r.server_id FROM upload_range_claims r WHERE r.file_hash = %(h)s "
                  "AND r.server_id <> %(me)s {overlap} AND " + _ALIVE.format(lock_class=LOCK_CLASS, holder="r.server_id"))
_OVERLAP = "AND r.range_start < %(end)s AND %(start)s < r.range_end"


def take_claim(conn: psycopg.Connection, hashed: str, server_id: str, claim_id: int) -> tuple[bool, list[str] | str | None]:
    """Hold the whole file for ``server_id`` if nobody alive does, neither the file nor a range of it
    (this server's own older claims do not count: its own registry took them over). Returns
    (granted, other): granted, ``other`` says whether it replaced a claim (of a dead server, or this
    one's own); refused, ``other`` lists the live holders' ids (empty if they let go just now: try
    again). One round trip (a pipeline)."""
    args = {"h": hashed, "me": server_id, "id": claim_id}
    with conn.pipeline(), conn.transaction():
        _lock_file(conn, hashed)
        took = conn.execute(
            "INSERT INTO upload_claims AS c (file_hash, server_id, claim_id) SELECT %(h)s, %(me)s, %(id)s "
            "WHERE NOT EXISTS (" + _OTHERS_RANGES.format(overlap="") + ") "
            "ON CONFLICT (file_hash) DO UPDATE SET server_id = excluded.server_id, claim_id = excluded.claim_id, "
            "claimed_at = now() WHERE c.server_id = excluded.server_id OR NOT "
            + _ALIVE.format(lock_class=LOCK_CLASS, holder="c.server_id")
            + " RETURNING (xmax::text <> '0')",  # a row updated, not inserted: it replaced a claim
            args)
        holders = conn.execute("SELECT server_id FROM upload_claims WHERE file_hash = %(h)s AND server_id <> %(me)s "
                               "UNION " + _OTHERS_RANGES.format(overlap=""), args)
    granted = took.fetchone()
    if granted is not None:
        return True, "replaced" if granted[0] else None
    return False, sorted({r[0] for r in holders.fetchall()})


def take_range_claim(conn: psycopg.Connection, hashed: str, start: int, end: int, server_id: str,
                     claim_id: int) -> tuple[bool, list[str] | str | None]:
    """Hold bytes [start, end) of the file for ``server_id`` if no live server holds the whole file or
    an overlapping range of it (this server's own claims do not count). Returns as ``take_claim``;
    granted, a dead server's overlapping claims are deleted ("replaced"). One round trip."""
    args = {"h": hashed, "me": server_id, "id": claim_id, "start": start, "end": end}
    with conn.pipeline(), conn.transaction():
        _lock_file(conn, hashed)
        holders = conn.execute(
            "SELECT u.server_id FROM upload_claims u WHERE u.file_hash = %(h)s AND u.server_id <> %(me)s AND "
            + _ALIVE.format(lock_class=LOCK_CLASS, holder="u.server_id")
            + " UNION " + _OTHERS_RANGES.format(overlap=_OVERLAP), args)
        free = "NOT EXISTS (SELECT 1 FROM upload_claims u WHERE u.file_hash = %(h)s AND u.server_id <> %(me)s AND " \
            + _ALIVE.format(lock_class=LOCK_CLASS, holder="u.server_id") + ") AND NOT EXISTS (" \
            + _OTHERS_RANGES.format(overlap=_OVERLAP) + ")"
        # a dead server's claims of these bytes are free whatever happens next: they go
        gone = conn.execute(
            "WITH a AS (DELETE FROM upload_range_claims r WHERE r.file_hash = %(h)s AND r.server_id <> %(me)s "
            + _OVERLAP + " AND NOT " + _ALIVE.format(lock_class=LOCK_CLASS, holder="r.server_id") + " RETURNING 1), "
            "b AS (DELETE FROM upload_claims u WHERE u.file_hash = %(h)s AND u.server_id <> %(me)s AND NOT "
            + _ALIVE.format(lock_class=LOCK_CLASS, holder="u.server_id") + " RETURNING 1) "
            "SELECT (SELECT count(*) FROM a) + (SELECT count(*) FROM b)", args)
        took = conn.execute(
            "INSERT INTO upload_range_claims AS c (file_hash, range_start, range_end, server_id, claim_id) "
            "SELECT %(h)s, %(start)s, %(end)s, %(me)s, %(id)s WHERE " + free
            + " ON CONFLICT (file_hash, range_start) DO UPDATE SET range_end = excluded.range_end, "
            "server_id = excluded.server_id, claim_id = excluded.claim_id, claimed_at = now() "
            "RETURNING (xmax::text <> '0')", args)
    granted = took.fetchone()
    if granted is not None:
        return True, "replaced" if granted[0] or gone.fetchone()[0] else None
    return False, sorted({r[0] for r in holders.fetchall()})


def take_claims(conn: psycopg.Connection, items: list[tuple[str, int]], server_id: str) -> set[str]:
    """``take_claim`` of many files at once (a batch): the hashes granted. A file a live server holds
    (whole or a range of it) is left out (no waiting, no takeover: a batch never takes a file over).
    One round trip (a pipeline); the files' locks are taken in one order, so batches never deadlock."""
    hashes, ids = [h for h, _ in items], [i for _, i in items]
    with conn.pipeline(), conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, k) FROM (SELECT DISTINCT hashtext(h) AS k "
                     "FROM unnest(%s::text[]) AS h ORDER BY k) AS keys", (FILE_LOCK_CLASS, hashes))
        rows = conn.execute(
            "INSERT INTO upload_claims AS c (file_hash, server_id, claim_id) "
            "SELECT v.file_hash, %(me)s, v.claim_id FROM unnest(%(hs)s::text[], %(ids)s::bigint[]) AS v(file_hash, claim_id) "
            "WHERE NOT EXISTS (SELECT 1 FROM upload_range_claims r WHERE r.file_hash = v.file_hash "
            "AND r.server_id <> %(me)s AND " + _ALIVE.format(lock_class=LOCK_CLASS, holder="r.server_id") + ") "
            "ON CONFLICT (file_hash) DO UPDATE SET server_id = excluded.server_id, claim_id = excluded.claim_id, "
            "claimed_at = now() WHERE c.server_id = excluded.server_id OR NOT "
            + _ALIVE.format(lock_class=LOCK_CLASS, holder="c.server_id")
            + " RETURNING c.file_hash",
            {"me": server_id, "hs": hashes, "ids": ids})
    return {r[0] for r in rows.fetchall()}


def drop_claims(conn: psycopg.Connection, items: list[tuple[str, int]]) -> int:
    """``drop_claim`` of many claims in one statement."""
    return conn.execute(
        "DELETE FROM upload_claims AS c USING unnest(%s::text[], %s::bigint[]) AS v(file_hash, claim_id) "
        "WHERE c.file_hash = v.file_hash AND c.claim_id = v.claim_id",
        ([h for h, _ in items], [i for _, i in items])).rowcount


def drop_claim(conn: psycopg.Connection, hashed: str, claim_id: int) -> bool:
    """Let go of one claim (not a newer one of the same file); True if it was there."""
    return conn.execute("DELETE FROM upload_claims WHERE file_hash = %s AND claim_id = %s",
                        (hashed, claim_id)).rowcount > 0


def drop_range_claim(conn: psycopg.Connection, hashed: str, start: int, claim_id: int) -> bool:
    """Let go of one range claim (not a newer one of the same range); True if it was there."""
    return conn.execute("DELETE FROM upload_range_claims WHERE file_hash = %s AND range_start = %s AND claim_id = %s",
                        (hashed, start, claim_id)).rowcount > 0


def holder_alive(conn: psycopg.Connection, hashed: str) -> bool:
    """Whether a live server holds the file, or a range of it."""
    row = conn.execute("SELECT 1 FROM upload_claims c WHERE c.file_hash = %(h)s AND "
                       + _ALIVE.format(lock_class=LOCK_CLASS, holder="c.server_id")
                       + " UNION ALL SELECT 1 FROM upload_range_claims c WHERE c.file_hash = %(h)s AND "
                       + _ALIVE.format(lock_class=LOCK_CLASS, holder="c.server_id") + " LIMIT 1",
                       {"h": hashed}).fetchone()
    return row is not None


def try_lock_completion(conn: psycopg.Connection, hashed: str) -> bool:
    """Take the file's completion lock on ``conn`` (session-level) if free: one server at a time checks
    a ranged file's blocks and completes it."""
    return conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (COMPLETION_LOCK_CLASS, hashed)).fetchone()[0]


def unlock_completion(conn: psycopg.Connection, hashed: str) -> bool:
    """Give the completion lock back (False if ``conn`` did not hold it: a new connection since)."""
    return conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (COMPLETION_LOCK_CLASS, hashed)).fetchone()[0]


def notify(conn: psycopg.Connection, server_id: str, payload: str) -> None:
    """Send ``payload`` to one server's channel."""
    conn.execute("SELECT pg_notify(%s, %s)", (channel_name(server_id), payload))
