"""collect_files: which local files an upload takes, their names in the job, and in what order."""

from __future__ import annotations

import os

import pytest

from filedock.client.uploader import collect_files
from filedock.errors import ErrorCode, FiledockError


def test_names_order_and_what_is_left_out(tmp_path):
    """A directory's own files come before its subdirectories, each sorted; names are relative with '/';
    a symlinked directory is not followed, a link to a file counts, FIFOs and dangling links do not."""
    root = tmp_path / "tree"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    for rel, size in (("z.txt", 3), ("m.txt", 1), ("b/x.bin", 5), ("b/deep/y.bin", 7), ("a/k", 0)):
        (root / rel).write_bytes(b"x" * size)
    (root / "link-to-b").symlink_to(root / "b", target_is_directory=True)
    (root / "link-to-m").symlink_to(root / "m.txt")
    (root / "dangling").symlink_to(root / "nowhere")
    os.mkfifo(root / "fifo")
    found = collect_files([root])
    assert [(f.name, f.size) for f in found] == [
        ("link-to-m", 1), ("m.txt", 1), ("z.txt", 3), ("a/k", 0), ("b/x.bin", 5), ("b/deep/y.bin", 7)]
    assert found[-1].path == root / "b" / "deep" / "y.bin"


def test_an_unreadable_directory_stops_the_upload(tmp_path, monkeypatch):
    """Files under a directory that cannot be read would be missing from the job without a word: a clear
    bad-request error instead (simulated: tests run as root, who reads everything)."""
    root = tmp_path / "tree"
    (root / "secret").mkdir(parents=True)
    (root / "ok.txt").write_bytes(b"ok")
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("secret"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(FiledockError) as info:
        collect_files([root])
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "secret: cannot read the directory: Permission denied" in info.value.message


def test_same_name_twice_is_a_conflict(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "f").write_bytes(b"1")
    (tmp_path / "f").write_bytes(b"2")
    with pytest.raises(FiledockError) as info:
        collect_files([tmp_path / "one", tmp_path / "f"])
    assert info.value.code is ErrorCode.CONFLICT


def test_a_name_that_is_not_utf8_is_named_in_the_error_and_link_loops_are_skipped(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    (root / "ok.txt").write_bytes(b"ok")
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(root / "loop-a", root / "loop-b")
    assert [f.name for f in collect_files([root])] == ["ok.txt"]
    bad = os.fsencode(root) + b"/caf\xe9.txt"
    with open(bad, "wb") as f:
        f.write(b"x")
    with pytest.raises(FiledockError) as info:
        collect_files([root])
    assert info.value.code is ErrorCode.BAD_REQUEST and "not valid UTF-8" in info.value.message
