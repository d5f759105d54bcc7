"""Schema migrations run at start, in order, and keep the data of an older database."""

from __future__ import annotations

import json
import sqlite3

from filedock.store.sqlite import MIGRATIONS, SQLiteStore


def version_one_database(path) -> dict:
    """A database as the first schema made it (by SQL: today's code writes today's schema), with a
    complete job, its file and a pending event; returns the ids and keys it holds."""
    job_id, file_key = "6f1c8f0e-0d51-4d4a-9d4b-0f3c1f0c9a11", "0b7a3c52-2a4e-4f61-8d3e-5a9d4c2b1e77"
    db = sqlite3.connect(path, isolation_level=None)
    for statement in filter(str.strip, MIGRATIONS[0].split(";")):
        db.execute(statement)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.execute("INSERT INTO jobs VALUES (?, 'kept', '{\"k\": \"v\"}', 1.0, 2.0, 'complete')", (job_id,))
    db.execute("INSERT INTO files VALUES (?, ?, 'a.bin', 3, 3, 'complete', 7, ?, 2.0, 2.0, NULL)",
               (file_key, job_id, "e" * 64))
    payload = {"id": "ev", "type": "job.complete", "job": {"id": job_id, "name": "kept"},
               "files": [{"name": "a.bin", "key": file_key, "size": 3, "crc32": "00000007", "digest": "e" * 64}],
               "time": 2.0}
    db.execute("INSERT INTO events (id, job_id, kind, payload, created) VALUES ('ev', ?, 'job.complete', ?, 2.0)",
               (job_id, json.dumps(payload)))
    db.close()
    return {"job": job_id, "file_key": file_key}


def test_version_one_database_upgrades_and_keeps_its_data(tmp_path):
    """A database made by the first schema (with a job, a file and a pending event) opens at the newest
    version with everything still there and the new columns defaulted."""
    path = tmp_path / "old.sqlite3"
    old = version_one_database(path)
    new = SQLiteStore(path)
    assert new.schema_version() == len(MIGRATIONS) >= 2
    job = new.find_job("kept")
    assert job.metadata == {"k": "v"}
    (record,) = new.list_files(job.id)
    assert record.digest == "e" * 64 and record.id == old["file_key"]  # the blob's name on disk stays
    assert new.get_file(record.key) == record
    (event,) = new.pending_events()
    assert event.job_id == job.id and event.delivered_to == ()
    assert event.payload["files"][0]["key"] == record.key
    new.mark_event(event.id, False, ["webhook http://a/"])
    assert new.pending_events()[0].delivered_to == ("webhook http://a/",)
    new.close()
