"""Client-side safety rules without a server: source stamps, --prefix, retry budget, safe repeats."""

from __future__ import annotations

import os

import pytest

from filedock.client.http import ApiError, recover_plan
from filedock.client.model import MAX_BACKOFF, RetryPolicy, SourceStamp, SourceWatch
from filedock.client.uploader import LocalFile, check_prefix, collect_files, undeclared
from filedock.errors import ErrorCode, FiledockError


def test_source_stamp_names_each_kind_of_change(tmp_path):
    """Growing, shrinking, rewriting in place (same size), replacing and deleting each read differently;
    an untouched file has no change."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    stamp = SourceStamp.of(os.stat(path))
    assert stamp.change(SourceStamp.read(path)) is None
    with open(path, "ab") as f:
        f.write(b"more")
    assert stamp.change(SourceStamp.read(path)) == "grew from 10 to 14 bytes"
    path.write_bytes(b"y" * 3)
    assert stamp.change(SourceStamp.read(path)) == "shrank from 10 to 3 bytes"
    path.write_bytes(b"z" * 10)
    os.utime(path, ns=(stamp.mtime_ns + 10**9, stamp.mtime_ns + 10**9))
    assert stamp.change(SourceStamp.read(path)) == "was modified"
    other = tmp_path / "g"
    other.write_bytes(b"x" * 10)
    os.replace(other, path)
    assert stamp.change(SourceStamp.read(path)) == "was replaced by another file"
    path.unlink()
    assert stamp.change(SourceStamp.read(path)) == "was deleted"


def test_source_watch_refuses_a_file_that_is_not_the_declared_version(tmp_path):
    """Opened after a change since it was declared: changed-during-upload at once, naming the file."""
    path = tmp_path / "take.wav"
    path.write_bytes(b"a" * 100)
    declared = SourceStamp.of(os.stat(path))
    with open(path, "ab") as f:
        f.write(b"b")
    with open(path, "rb") as f, pytest.raises(FiledockError) as info:
        SourceWatch(path, f.fileno(), "take.wav", declared)
    assert info.value.code is ErrorCode.CHANGED_DURING_UPLOAD
    assert info.value.message.startswith("take.wav: the local file grew from 100 to 101 bytes")
    assert "nothing was recorded complete" in info.value.message


@pytest.mark.parametrize("raw,expected", [("", ""), ("sub1", "sub1/"), ("sub1/", "sub1/"), ("a/b/", "a/b/")])
def test_prefix_is_a_relative_folder(raw, expected):
    assert check_prefix(raw) == expected


@pytest.mark.parametrize("raw", ["/abs/", "../up/", "a/../b", "./x", "a//b", "\\unc"])
def test_prefix_refuses_path_tricks(raw):
    with pytest.raises(FiledockError) as info:
        check_prefix(raw)
    assert info.value.code is ErrorCode.BAD_REQUEST and "--prefix" in info.value.message


def test_collect_files_puts_the_prefix_before_every_name(tmp_path):
    """A directory's files keep their relative names under the prefix; a file given directly too."""
    root = tmp_path / "session-42" / "sub1"
    (root / "deep").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"a")
    (root / "deep" / "b.txt").write_bytes(b"b")
    (tmp_path / "c.txt").write_bytes(b"c")
    names = [f.name for f in collect_files([root, tmp_path / "c.txt"], prefix="sub1")]
    assert names == ["sub1/a.txt", "sub1/deep/b.txt", "sub1/c.txt"]


def test_a_size_conflict_is_collected_not_raised_when_asked(tmp_path):
    """undeclared() with a conflicts dict: the conflicting file is named with advice, the others planned."""
    job = {"name": "j", "files": [{"name": "a", "size": 5, "key": "k", "state": "complete"}]}
    local = [LocalFile(tmp_path / "a", "a", 6), LocalFile(tmp_path / "b", "b", 1)]
    conflicts: dict[str, str] = {}
    declared, missing = undeclared(job, local, conflicts)
    assert [f.name for f in missing] == ["b"]
    assert "differs from the job's copy" in conflicts["a"] and "--replace" in conflicts["a"]
    with pytest.raises(FiledockError) as info:
        undeclared(job, local)
    assert info.value.code is ErrorCode.CONFLICT


def test_retry_delays_double_within_jitter_and_are_capped():
    policy = RetryPolicy(attempts=5, backoff=0.5)
    for failures, base in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0)):
        assert 0.5 * base <= policy.delay(failures) <= 1.5 * base
    assert policy.delay(40) <= 1.5 * MAX_BACKOFF


def test_repeated_create_is_reconciled_only_with_the_same_name_and_metadata():
    """A conflict on a repeated POST /v1/jobs is ours if the job has the metadata sent; a first attempt's
    conflict, or another's job, stays a conflict."""
    body = {"name": "takes", "metadata": {"k": "v"}}
    repeated = ApiError(ErrorCode.CONFLICT, "exists", 409, repeated=True)
    path, check = recover_plan("POST", "/v1/jobs", body, repeated)
    assert path == "/v1/jobs/takes"
    assert check({"name": "takes", "metadata": {"k": "v"}, "id": "i"})["id"] == "i"
    assert check({"name": "takes", "metadata": {"k": "other"}, "id": "i"}) is None
    assert recover_plan("POST", "/v1/jobs", body, ApiError(ErrorCode.CONFLICT, "exists", 409)) is None


def test_repeated_declaration_is_reconciled_by_name_and_size():
    body = {"files": [{"name": "a", "size": 1}, {"name": "b", "size": 2}]}
    repeated = ApiError(ErrorCode.CONFLICT, "taken", 409, repeated=True)
    path, check = recover_plan("POST", "/v1/jobs/J/files", body, repeated)
    assert path == "/v1/jobs/J"
    job = {"files": [{"name": "b", "size": 2, "key": "kb"}, {"name": "a", "size": 1, "key": "ka"}]}
    assert [f["key"] for f in check(job)["files"]] == ["ka", "kb"]
    job["files"][0]["size"] = 3
    assert check(job) is None
    one_path, one = recover_plan("POST", "/v1/jobs/J/files", {"name": "a", "size": 1}, repeated)
    assert one({"files": [{"name": "a", "size": 1, "key": "ka"}]})["key"] == "ka"


def test_repeated_delete_of_a_job_that_is_gone_is_done():
    repeated = ApiError(ErrorCode.NOT_FOUND, "no job", 404, repeated=True)
    path, check = recover_plan("DELETE", "/v1/jobs/old%20job", None, repeated)
    assert path == "/v1/jobs"
    assert check({"jobs": []}) == {"deleted": "old job"}
    assert check({"jobs": [{"id": "x", "name": "old job"}]}) is None
    assert recover_plan("POST", "/v1/jobs/J/sessions", {}, repeated) is None  # nothing to reconcile


def test_store_new_version_waits_unlisted_then_takes_the_old_ones_place(tmp_path):
    """The server side of `upload --replace`: a new version is declared beside the file, hidden from
    the listing (the job stays complete with the old one), returned again by a second declaration
    (reset if the size differs), and on completion replaces the old record in one transaction."""
    from filedock.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "db.sqlite3")
    job = store.create_job("j", {})
    (old,) = store.add_files(job.id, [("a.bin", 3)])
    store.record_complete(old.key, 1, "a" * 64)
    (new,) = store.add_files(job.id, [("a.bin", 5)], replace=frozenset({"a.bin"}))
    assert new.key != old.key and new.replaces == old.id and new.public_name == "a.bin"
    assert new.to_json()["name"] == "a.bin" and new.to_json()["replaces"] == old.key
    assert [(f.key, f.state) for f in store.list_files(job.id)] == [(old.key, "complete")]
    assert store.find_job("j").state == "complete"
    (again,) = store.add_files(job.id, [("a.bin", 5)], replace=frozenset({"a.bin"}))
    assert again.key == new.key
    (resized,) = store.add_files(job.id, [("a.bin", 7)], replace=frozenset({"a.bin"}))
    assert (resized.key, resized.size, store.get_file(new.key).size) == (new.key, 7, 7)
    with pytest.raises(FiledockError) as info:
        store.add_files(job.id, [("a.bin", 7)])  # without replace: still a conflict
    assert info.value.code is ErrorCode.CONFLICT
    store.record_complete(new.key, 2, "b" * 64)
    assert [(f.key, f.name, f.digest) for f in store.list_files(job.id)] == [(new.key, "a.bin", "b" * 64)]
    assert store.get_file(old.key) is None and store.get_file(new.key).replaces is None
    (plain,) = store.add_files(job.id, [("b.bin", 1)], replace=frozenset({"b.bin"}))
    assert plain.replaces is None and plain.name == "b.bin"  # nothing to replace: a plain declaration
