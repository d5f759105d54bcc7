"""Issue 10, item 11: a copy of the metadata database grants nothing, and the data dir is owner-only.

Session keys are stored as their SHA-256; a file's key is derived from its id with a secret
kept outside the database (``filedock.secret``) and found by its SHA-256; blobs are named by
the file's id. An older database (keys in clear, blobs named by key) is converted at open.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import stat

import pytest

from filedock.server.service import open_store
from filedock.store.blobs import BlobStore
from filedock.store.sqlite import MIGRATIONS, SQLiteStore
from tests.unit.test_migrations import version_one_database

UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def raw_bytes(db_path) -> bytes:
    """Everything of the database on disk: the file and its WAL and shared-memory files."""
    out = b""
    for suffix in ("", "-wal", "-shm"):
        path = db_path.with_name(db_path.name + suffix)
        if path.exists():
            out += path.read_bytes()
    return out


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def busy_store(tmp_path):
    """A data dir with a job, a complete file (and its event), a pending file, a session and a token."""
    store = open_store(tmp_path / "data")
    job = store.create_job("j", {})
    done, pending = store.add_files(job.id, [("done.bin", 3), ("pending.bin", 5)])
    store.record_complete(done.key, 7, "e" * 64)
    session = store.open_session(job.id, 3600.0)
    token = store.create_token("t")
    yield store, {"job": job, "done": done, "pending": pending, "session": session, "token": token}
    store.close()


def test_no_live_key_or_token_is_in_the_database_in_clear(busy_store, tmp_path):
    """Neither a session key, a file key nor a token appears in the database's bytes; and no
    UUID-shaped string found there is a usable session or file key."""
    store, w = busy_store
    raw = raw_bytes(tmp_path / "data" / "filedock.sqlite3")
    for secret in (w["session"].key, w["done"].key, w["pending"].key, w["token"]):
        assert secret.encode() not in raw
    found = set(UUID.findall(raw))
    assert w["done"].id.encode() in found  # ids are there, in clear: they name, they do not open
    for text in found:
        assert store.get_file(text.decode()) is None
        assert store.get_session(text.decode()) is None


def test_a_copy_of_the_database_alone_grants_nothing(busy_store, tmp_path):
    """Copied without the secret file, the database yields no file key: opened elsewhere, the keys it
    derives are others, and the real keys still open their files only where the secret is."""
    store, w = busy_store
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(tmp_path / "data"):
        if name.startswith("filedock.sqlite3"):
            shutil.copy(tmp_path / "data" / name, copy / name)
    stolen = SQLiteStore(copy / "filedock.sqlite3")
    listed = {f.name: f.key for f in stolen.list_files(w["job"].id)}
    assert listed["done.bin"] != w["done"].key and listed["pending.bin"] != w["pending"].key
    assert store.get_file(listed["done.bin"]) is None
    stolen.close()


def test_keys_are_shown_again_where_they_were_shown_before(busy_store):
    """A file's key is the same in every listing and in the event's payload, and it finds the file;
    a session is found by its key, and its record carries that key."""
    store, w = busy_store
    assert {f.key for f in store.list_files(w["job"].id)} == {w["done"].key, w["pending"].key}
    assert store.get_file(w["done"].key).name == "done.bin"
    store.record_complete(w["pending"].key, 1, "f" * 64)  # the job completes: its event lists both files
    (event,) = store.pending_events()
    assert [f["key"] for f in event.payload["files"]] == [w["done"].key, w["pending"].key]
    assert store.get_session(w["session"].key).key == w["session"].key
    assert store.session_and_file(w["session"].key, w["pending"].key)[1].name == "pending.bin"
    (stored,) = store._read("SELECT payload FROM events")
    assert w["done"].key not in stored[0]


def test_every_file_of_the_data_dir_is_owner_only(busy_store, tmp_path):
    """The database (with its -wal and -shm), the secret and blobs are 0600; the data dir and the job
    and staging directories 0700; whatever the umask."""
    store, w = busy_store
    old = os.umask(0o022)
    try:
        blobs = BlobStore(tmp_path / "data")
        writer = blobs.open_partial(w["job"].id, w["pending"].blob_name, 0, 0, None)
        writer.write(b"abc")
        writer.checkpoint()
        writer.close()
    finally:
        os.umask(old)
    data = tmp_path / "data"
    assert mode(data) == 0o700
    for name in ("filedock.sqlite3", "filedock.sqlite3-wal", "filedock.sqlite3-shm", "filedock.secret"):
        assert mode(data / name) == 0o600, name
    assert mode(data / "jobs") == 0o700 and mode(data / "jobs" / w["job"].id) == 0o700
    part = blobs.part_path(w["job"].id, w["pending"].blob_name)
    assert mode(part) == 0o600


def test_a_world_readable_database_is_made_owner_only(tmp_path):
    """A database an older version left 0644 is made 0600 when opened."""
    path = tmp_path / "filedock.sqlite3"
    SQLiteStore(path).close()
    os.chmod(path, 0o644)
    SQLiteStore(path).close()
    assert mode(path) == 0o600


def test_an_older_database_is_converted_and_its_old_keys_scrubbed(tmp_path):
    """A schema-3 database (keys in clear): the session keeps working with its key; the file keeps its
    blob name (its old key becomes its id) and gets a new key, the old one opening nothing; neither
    old key is left anywhere in the database's bytes."""
    path = tmp_path / "filedock.sqlite3"
    old = version_one_database(path)
    session_key = "5d9f6c1a-7b2e-4c3d-9e8f-0a1b2c3d4e5f"
    db = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[1:3]:
        for statement in filter(str.strip, script.split(";")):
            db.execute(statement)
    db.execute("INSERT INTO schema_version VALUES (2)")
    db.execute("INSERT INTO schema_version VALUES (3)")
    db.execute("INSERT INTO sessions VALUES (?, ?, 1.0, 4e9, NULL, 'upload')", (session_key, old["job"]))
    db.close()
    store = SQLiteStore(path)
    assert store.schema_version() == len(MIGRATIONS)
    session = store.get_session(session_key)
    assert session is not None and session.scope == "upload" and session.job_id == old["job"]
    (record,) = store.list_files(old["job"])
    assert record.blob_name == old["file_key"] and record.key != old["file_key"]
    assert store.get_file(old["file_key"]) is None and store.get_file(record.key) == record
    assert store.session_and_file(session_key, record.key)[1] == record
    raw = raw_bytes(path)
    assert session_key.encode() not in raw
    (payload,) = store._read("SELECT payload FROM events")
    assert record.key not in payload[0]
    assert json.loads(payload[0])["files"][0]["key"] == old["file_key"]  # the id, as it was stored
    store.close()


def test_a_new_secret_gives_every_file_a_new_key(busy_store, tmp_path):
    """Deleting the secret file and reopening changes every file key (the way to revoke them all);
    the records and blob names stay."""
    store, w = busy_store
    store.close()
    (tmp_path / "data" / "filedock.secret").unlink()
    again = open_store(tmp_path / "data")
    records = {f.name: f for f in again.list_files(w["job"].id)}
    assert records["done.bin"].key != w["done"].key and records["done.bin"].id == w["done"].id
    assert again.get_file(w["done"].key) is None
    assert again.get_file(records["done.bin"].key).digest == "e" * 64
    again.close()
