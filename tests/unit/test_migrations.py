"""Schema migrations run at start, in order, and keep the data of an older database."""

from __future__ import annotations

import sqlite3

from filedock.store import sqlite as sqlite_store
from filedock.store.sqlite import MIGRATIONS, SQLiteStore


def test_version_one_database_upgrades_and_keeps_its_data(tmp_path, monkeypatch):
    """A database made by the first schema (with a job, a file and a pending event) opens at the newest
    version with everything still there and the new column defaulted."""
    path = tmp_path / "old.sqlite3"
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", MIGRATIONS[:1])
    old = SQLiteStore(path)
    assert old.schema_version() == 1
    job = old.create_job("kept", {"k": "v"})
    record = old.add_file(job.id, "a.bin", 3)
    assert old.record_complete(record.key, 7, "e" * 64)  # the job completes: one event in the outbox
    old.close()
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(events)")}
    assert "delivered_to" not in columns

    monkeypatch.setattr(sqlite_store, "MIGRATIONS", MIGRATIONS)
    new = SQLiteStore(path)
    assert new.schema_version() == len(MIGRATIONS) >= 2
    assert new.find_job("kept").metadata == {"k": "v"}
    assert new.get_file(record.key).digest == "e" * 64
    (event,) = new.pending_events()
    assert event.job_id == job.id and event.delivered_to == ()
    new.mark_event(event.id, False, ["webhook http://a/"])
    assert new.pending_events()[0].delivered_to == ("webhook http://a/",)
    new.close()
