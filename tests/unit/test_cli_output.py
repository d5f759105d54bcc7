"""What the command line prints for people (issue 15, items 3 and 4): help, tables, progress marks."""

from __future__ import annotations

import argparse
import io
import json
from contextlib import redirect_stdout

import pytest

from filedock import cli
from filedock.client import blocking
from filedock.client.commands import _mark
from filedock.client.model import SENT


def _parsers(parser: argparse.ArgumentParser, path: str = "filedock"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_option_has_help_with_its_default_and_no_rst_markup():
    """Each option of each command says what it does, names its default, and no help holds ``markup``."""
    for path, parser in _parsers(cli.build_parser()):
        text = parser.format_help()
        assert "``" not in text, path
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{path} {action.dest} has no help"
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                shown = parser._get_formatter()._get_help_string(action) % {"default": action.default}
                assert "default" in shown, f"{path} {action.option_strings[0]} does not name its default"


def test_no_arguments_lists_the_commands(capsys):
    """`filedock` alone prints the commands and exits 0; `filedock job` alone lists its actions."""
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for command in ("serve", "upload", "download", "jobs", "job", "token", "fsck", "status"):
        assert f"    {command}" in out
    assert cli.main(["job"]) == 0
    out = capsys.readouterr().out
    assert all(action in out for action in ("create", "show", "delete"))


def test_version(capsys):
    """`filedock --version` prints the version."""
    import filedock

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"filedock {filedock.__version__}"


@pytest.mark.parametrize("argv", [["--json", "jobs"], ["jobs", "--json"], ["--json", "job", "show", "J"],
                                  ["job", "show", "J", "--json"]])
def test_json_before_or_after_the_command(argv):
    """--json is taken on either side of the command."""
    args, _ = cli.build_parser().parse_known_args(argv)
    assert args.json is True


def test_finished_rows_keep_their_width():
    """A bar's description is as wide before, during and after (✓ or ✗): the columns never shift."""
    from rich.text import Text

    widths = {Text.from_markup(_mark(mark, "take1.wav")).cell_len for mark in (" ", "[green]✓[/]", "[red]✗[/]")}
    assert len(widths) == 1


def test_job_table_keeps_whole_names_and_readable_text(monkeypatch):
    """`job show` piped: a table, the whole long name on one line, dates not epochs, no \\u escapes."""
    long_name = "session-42/" + "very-long-directory-name/" * 6 + "take-01.wav"
    job = {"id": "0f0e0d0c-0000-4000-8000-000000000001", "name": "café", "state": "open",
           "created": 1_733_000_000.25, "updated": 1_733_000_100.5, "metadata": {"studio": "Bühne"},
           "files_total": 1, "files_complete": 0,
           "files": [{"name": long_name, "state": "partial", "received": 1_300_000_000, "size": 2_000_000_000,
                      "crc32": None, "digest": None, "uploaded_at": None, "key": "k"}]}
    out = io.StringIO()
    with redirect_stdout(out):
        cli._print_job(job)
    text = out.getvalue()
    assert long_name in text and "café" in text and "Bühne" in text
    assert "\\u" not in text and "1733000000" not in text
    assert "1.3 GB" in text and "2.0 GB" in text
    with pytest.raises(ValueError):
        json.loads(text)


def test_progress_reports_every_100ms_while_bytes_flow():
    """A slow transfer of a big file: a `sent` report at least every 100 ms (it was every 1 MiB)."""
    now = [0.0]
    seen: list[float] = []
    reports = blocking._Reports(lambda stage, done, total: seen.append(now[0]), clock=lambda: now[0])
    total, done = 10 * 10**9, 0
    for _ in range(200):  # 16 KiB every 40 ms: 400 kB/s
        now[0] += 0.04
        done += 16 * 1024
        reports(SENT, done, total)
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert len(seen) > 50 and max(gaps) <= 0.1 + 0.04 + 1e-9  # reports come with the bytes: 100 ms + one piece


def test_progress_reports_every_percent_of_a_small_file():
    """A small file's bar moves at least every 1% even when the bytes come fast."""
    seen: list[int] = []
    reports = blocking._Reports(lambda stage, done, total: seen.append(done), clock=lambda: 0.0)
    total = 100_000
    for done in range(1000, total, 1000):
        reports(SENT, done, total)
    assert len(seen) >= 90


@pytest.mark.parametrize("columns", ["123", "", "junk", "-5"])
def test_help_is_as_wide_as_shutil_would_make_it(monkeypatch, columns):
    """``HelpWithDefaults`` finds the width as ``shutil.get_terminal_size`` does (``COLUMNS``, else the
    terminal, else 80), without importing ``shutil`` at start-up."""
    import shutil

    from filedock.cli import HelpWithDefaults

    monkeypatch.setenv("COLUMNS", columns)
    assert HelpWithDefaults("filedock")._width == shutil.get_terminal_size().columns - 2
    assert HelpWithDefaults("filedock", width=50)._width == 50
