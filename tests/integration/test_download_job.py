"""`filedock download --job J --all DIR`: a whole job back into a directory, resumable and verified."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.harness import ServerProcess
from tests.integration.test_upload_cli import MiB, filedock, json_lines, local_values, make_tree


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A server of its own; the user's config file kept out of the way."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with ServerProcess(tmp_path / "data") as proc:
        yield proc


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_whole_job_comes_back_byte_identical_and_a_rerun_fetches_nothing(server, tmp_path):
    """Upload a nested tree, download the job with --all --json: every file at its relative path, the
    same bytes, no .part left; each row has the path and the server's digest. Run again: every file is
    verified where it is (received 0)."""
    tree = make_tree(tmp_path / "in")
    assert filedock(server, "upload", "--job", "back", "--create", str(tmp_path / "in")).returncode == 0
    out = tmp_path / "out"
    run = filedock(server, "download", "--job", "back", "--all", "--json", str(out))
    assert run.returncode == 0, run.stderr
    rows = json_lines(run.stdout)
    assert set(rows) == set(tree)
    assert files_under(out) == {name: path.read_bytes() for name, path in tree.items()}
    for name, row in rows.items():
        assert row["state"] == "complete" and row["path"] == str(out.joinpath(*name.split("/")))
        assert (row["crc32"], row["digest"]) == local_values(tree[name])
    assert rows["nested/deeper/big.bin"]["sent"] == 20 * MiB
    again = json_lines(filedock(server, "download", "--job", "back", "--all", "--json", str(out)).stdout)
    assert {name: (row["state"], row["sent"]) for name, row in again.items()} == \
        {name: ("complete", 0) for name in tree}


def test_what_cannot_be_downloaded_is_named_and_the_rest_arrives(server, tmp_path):
    """A declared file never uploaded is `not-complete`; a local file of the same name with other bytes is
    left alone (`conflict`); a half-downloaded .part is resumed; the others arrive; exit status 1."""
    tree = make_tree(tmp_path / "in")
    assert filedock(server, "upload", "--job", "mixed", "--create", str(tmp_path / "in")).returncode == 0
    server.api.add_file(server.api.job("mixed")["id"], "later.wav", 1234)
    out = tmp_path / "out"
    (out / "nested").mkdir(parents=True)
    (out / "nested" / "small.txt").write_bytes(b"my own notes")
    big = tree["nested/deeper/big.bin"].read_bytes()
    big_key = next(f["key"] for f in server.api.job("mixed")["files"] if f["name"] == "nested/deeper/big.bin")
    (out / ".filedock-partial").mkdir()
    (out / ".filedock-partial" / big_key).write_bytes(big[:7 * MiB])  # left by an interrupted run
    (out / "top.bin.part").write_bytes(b"a file of the user's that happens to end in .part")
    run = filedock(server, "download", "--job", "mixed", "--all", "--json", str(out))
    assert run.returncode == 1
    rows = json_lines(run.stdout)
    assert rows["later.wav"]["state"] == "not-complete"
    assert rows["nested/small.txt"]["state"] == "conflict"
    assert (out / "nested" / "small.txt").read_bytes() == b"my own notes"
    assert rows["nested/deeper/big.bin"]["resumed_from"] == 7 * MiB
    assert (out / "nested" / "deeper" / "big.bin").read_bytes() == big
    assert {n: r["state"] for n, r in rows.items() if n not in ("later.wav", "nested/small.txt")} == \
        {n: "complete" for n in tree if n != "nested/small.txt"}
    assert "error: not-complete: " in run.stderr and "error: conflict: " in run.stderr
    assert "Traceback" not in run.stderr
    assert (out / "top.bin.part").read_bytes() == b"a file of the user's that happens to end in .part"
    assert not (out / ".filedock-partial").exists()  # emptied, then removed


def test_symbolic_links_in_the_directory_are_never_followed(server, tmp_path):
    """A directory on the way, or the file itself, being a symbolic link (to somewhere outside) is refused
    for that file (`conflict`) and nothing is written outside; the other files arrive."""
    tree = make_tree(tmp_path / "in")
    assert filedock(server, "upload", "--job", "links", "--create", str(tmp_path / "in")).returncode == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "nested").symlink_to(outside, target_is_directory=True)
    (out / "top.bin").symlink_to(outside / "victim")
    run = filedock(server, "download", "--job", "links", "--all", "--json", str(out))
    assert run.returncode == 1
    rows = json_lines(run.stdout)
    for name in ("top.bin", "nested/small.txt", "nested/zero", "nested/deeper/big.bin"):
        assert rows[name]["state"] == "conflict" and "symbolic link" in rows[name]["message"], rows[name]
    assert rows["empty"]["state"] == "complete"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"precious"


def test_usage_errors_and_arguments_in_any_order(server, tmp_path):
    """Wrong counts of positionals are usage errors (exit 2); NAME DEST may sit around the options, as
    before --all existed; --all into a file is refused."""
    wrong = filedock(server, "download", "--job", "x", "--all", "a", "b")
    assert wrong.returncode == 2 and "download --all takes one directory" in wrong.stderr
    assert filedock(server, "download", "--job", "x", "only-a-name").returncode == 2
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.wav").write_bytes(b"audio")
    assert filedock(server, "upload", "--job", "order", "--create", str(tmp_path / "in" / "a.wav")).returncode == 0
    (tmp_path / "got").mkdir()
    run = filedock(server, "download", "a.wav", "--job", "order", "--json", str(tmp_path / "got"))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "got" / "a.wav").read_bytes() == b"audio"
    (tmp_path / "file").write_bytes(b"")
    job = server.api.create_job("has-files")
    server.api.add_file(job["id"], "f", 0)
    run = filedock(server, "download", "--job", "has-files", "--all", str(tmp_path / "file"))
    assert run.returncode == 1 and "is not a directory" in run.stderr
