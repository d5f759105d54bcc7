"""Where a job's file goes on download: server-given names never become paths outside the directory."""

from __future__ import annotations

import os

from filedock.client.downloader import local_path


def test_names_that_cannot_be_paths_never_leave_the_directory(tmp_path):
    """Names come from the server: anything absolute, with empty, '.' or '..' parts, or a NUL is refused;
    what is accepted stays under the directory."""
    root = tmp_path / "out"
    for bad in ("../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "", "a\0b", "..", "a/",
                ".filedock-partial/x"):
        assert local_path(root, bad) is None, bad
    for good, rel in (("a", "a"), ("a/b/c.wav", "a/b/c.wav"), ("...", "..."), ("a b\\c", "a b\\c")):
        path = local_path(root, good)
        assert path == root.joinpath(*rel.split("/"))
        assert os.path.commonpath([path, root]) == str(root)
