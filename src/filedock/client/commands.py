"""The client's transfer commands: ``filedock upload``, ``filedock download``, ``filedock status``.

``filedock.cli`` adds them through ``add_parsers``. Progress bars and tables go
through rich (bars on stderr, so stdout holds only the result); ``--json`` prints
one JSON object per line per file instead. Exit status: 0 all files done, 1 any
failure (each printed as ``error: <code>: <message>`` on stderr), 130 on Ctrl-C,
after which running the same command again resumes.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from filedock.client.model import SENT, VERIFIED, Cancelled, TransferResult
from filedock.errors import ErrorCode, FiledockError
from filedock.record import record

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

RESUME_HINT = "cancelled: the server keeps what it received; run the same command again to resume"


@record
class CliServices:
    """What these commands take from the CLI around them. ``filedock.cli`` passes them in, so this
    module never imports it (the two used to import each other)."""

    api_client: Callable[[argparse.Namespace], Any]  # the ApiClient the flags, environment and config describe
    stdout_console: Callable[[], Any]  # a rich console on stdout
    emit: Callable[..., None]  # JSON with --json, else the human form


def add_parsers(sub: Any, client_flags: Callable[[argparse.ArgumentParser], None], services: CliServices) -> None:
    """Add ``upload``, ``download`` and ``status`` to the ``filedock`` command's subparsers."""
    p = sub.add_parser("upload", help="upload files and directories into a job (resumable, verified)",
                       description="Upload files and directories into a job. Run the same command again "
                                   "after an interruption to resume. Names in the job: a FILE is named by "
                                   "its last part (a/b/take.wav -> take.wav); the files under a DIR are named "
                                   "by their path under DIR, without DIR's own name (session-42/sub1 holding "
                                   "a.txt -> a.txt, not sub1/a.txt). --prefix sub1/ puts them under sub1/. "
                                   "A file whose name the job holds with other bytes is a conflict: it is "
                                   "reported and the others go on (--replace uploads it as a new version).")
    p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", type=Path,
                   help="files (named by their base name) and directories (their files named by the path "
                        "under the directory)")
    p.add_argument("--job", required=True, metavar="JOB", help="job id or name")
    p.add_argument("--create", action="store_true", help="create the job if there is none of that name")
    p.add_argument("--prefix", default="", metavar="NAME/",
                   help="put every file under this folder-like name in the job (default: none)")
    p.add_argument("--replace", action="store_true",
                   help="upload a file whose name the job holds with other bytes as a new version; the job "
                        "keeps the old one until the new one is complete and verified (default: report a "
                        "conflict and leave it)")
    p.add_argument("--parallel", type=_positive(int), default=1, metavar="N",
                   help="files sent at once (default 1: one after another)")
    p.add_argument("--congestion-control", type=_congestion_control, metavar="NAME",
                   default=os.environ.get("FILEDOCK_TCP_CONGESTION") or None,
                   help="TCP congestion control of the data connections, e.g. bbr or cubic (else "
                        "FILEDOCK_TCP_CONGESTION, else the system's default); --json reports the one used")
    p.add_argument("--streams", type=_streams, metavar="K|auto", default=None,
                   help="send each large file (8 MiB or more) over K connections at once, each a range of it "
                        "(fills long or lossy links); auto picks K from the measured round-trip time (one "
                        "stream on a LAN); default: one connection per file")
    _transfer_flags(p)
    client_flags(p)
    p.set_defaults(func=cmd_upload, services=services, enables_gc=True)

    p = sub.add_parser("download", help="download a file of a job, or all of them (resumable, verified)",
                       usage="filedock download --job JOB NAME DEST | filedock download --job JOB --all DIR",
                       description="Download one complete file (NAME) to DEST, or with --all every complete "
                                   "file of the job into DIR, names with / making subdirectories. Run the "
                                   "same command again after an interruption to resume; files already "
                                   "there with the server's digest are verified, not fetched again.")
    p.add_argument("--job", required=True, metavar="JOB", help="job id or name")
    p.add_argument("--all", action="store_true", help="every complete file of the job, into the directory DIR")
    p.add_argument("--force", action="store_true",
                   help="replace a local file that holds other bytes (the job's copy is downloaded beside it, "
                        "verified, then renamed over it); without it such a file is left alone")
    p.add_argument("targets", nargs="+", metavar="NAME DEST | DIR",
                   help="the file's name in the job and where to write it (a directory: under its name); "
                        "with --all, the directory")
    p.set_defaults(trailing_positionals="targets")
    _transfer_flags(p)
    client_flags(p)
    p.set_defaults(func=cmd_download, services=services)

    p = sub.add_parser("status", help="uploads in progress on the server")
    client_flags(p)
    p.set_defaults(func=cmd_status, services=services)


def _transfer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attempts", type=_positive(int), default=5, metavar="N",
                   help="connections in a row that may fail without progress before giving up (default 5)")
    p.add_argument("--stall-timeout", type=_positive(float), default=60.0, metavar="S",
                   help="seconds without progress before reconnecting (default 60)")


def _streams(raw: str) -> int | str:
    from filedock.client.ranges import MAX_STREAMS

    if raw == "auto":
        return raw
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_STREAMS:
        raise argparse.ArgumentTypeError(f"--streams takes a number from 1 to {MAX_STREAMS}, or auto, not {raw!r}")
    return value


def _congestion_control(raw: str) -> str:
    from filedock.client.blocking import congestion_control

    try:
        return congestion_control(raw)
    except OSError as exc:
        try:
            with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
                offered = f"; this system allows: {f.read().strip()}"
        except OSError:
            offered = ""
        raise argparse.ArgumentTypeError(f"{raw!r} cannot be used here ({exc.strerror or exc}){offered}") from None


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0: {raw!r}")
        return value

    return parse


def _local_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Local I/O failures (unreadable file, unwritable destination) as error lines, not tracebacks."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise FiledockError(ErrorCode.INTERNAL_ERROR, f"{where}{exc.strerror or exc}") from None

    return run


def _data_client(api: Any, args: argparse.Namespace):
    from filedock.client.uploader import data_client_for

    return data_client_for(api, stall_timeout=args.stall_timeout, attempts=args.attempts,
                           congestion_control=getattr(args, "congestion_control", None),
                           streams=getattr(args, "streams", None))


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _print_error(code: str, message: str) -> None:
    print(f"error: {code}: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- upload


HASH_AHEAD_MIN = 8 << 20
"""A first file at least this large is hashed from the start of ``filedock upload`` on
(``blocking.hash_ahead``): smaller ones are over in a few milliseconds either way."""


AHEAD_SWITCH_INTERVAL = 0.0005
"""Seconds the interpreter lets a thread hold the GIL while another waits (``sys.setswitchinterval``;
5 ms by default), from the start of hashing ahead until the API has answered. The digest thread
needs the GIL back after each read and each hash call, and the main thread is importing and
building requests: at 5 ms it waited up to 15 ms per MiB and hashed next to nothing before the
first byte went out. At 0.5 ms it hashes alongside, and less hashing is left to compete with
the server once the bytes flow: ``filedock upload`` of 1 GiB 1.059x faster by pairs (14
interleaved pairs, medians 1.325 against 1.261 s)."""


@_local_errors
def cmd_upload(args: argparse.Namespace) -> int:
    args.quick_exit = True  # filedock.cli.entry: no interpreter finalization after the last line
    switch = sys.getswitchinterval()
    # under TLS the digest thread reads for the sender too (blocking._SharedChunks): no hashing ahead
    if not _tls_named(args) and _hash_first_file_ahead(args.paths):
        sys.setswitchinterval(AHEAD_SWITCH_INTERVAL)
    try:
        api = args.services.api_client(args)
        from filedock.client.uploader import JobUploader

        gc.enable()  # off since start-up (filedock.cli.entry, enables_gc): the imports are done

        uploader = JobUploader(api, make_data_client=lambda: _data_client(api, args))
        plan = uploader.prepare(args.job, args.paths, create=args.create, prefix=args.prefix, replace=args.replace)
    finally:
        sys.setswitchinterval(switch)
    from filedock.client.blocking import congestion_control

    sent_with = {"congestion_control": congestion_control(args.congestion_control)}
    view = _JsonLines(extra=sent_with) if args.json else _UploadBars(plan)
    try:
        with view:
            results = uploader.run(plan, parallel=args.parallel, progress=view.progress,
                                   cancel=threading.Event(), on_result=view.result)
    except (Cancelled, KeyboardInterrupt):
        print(RESUME_HINT, file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    failed = [r for r in results if r.state != "complete"]
    for r in failed:
        _print_error(r.state, r.message or f"{r.name}: not uploaded")
    if not args.json:
        _print_summary(args.services.stdout_console(), plan.job, results)
    return EXIT_FAILED if failed else 0


def _tls_named(args: argparse.Namespace) -> bool:
    """Whether the flags or the environment already say TLS (before the API client is made; a config
    file's https:// URL is found later: then the digest hashed ahead is used all the same, and the
    sender reads the file itself)."""
    return bool(getattr(args, "tls", False)) or (getattr(args, "server", None) or os.environ.get("FILEDOCK_URL")
                                                  or "").lower().startswith("https:")


def _hash_first_file_ahead(paths: list[Path]) -> bool:
    """Start hashing the first file named on the command line while the API is asked (the files
    are sent in order, so it is the first one sent); True if it started. Not under TLS: there a
    digest that starts with the sending reads each chunk for both, which saves more than a head
    start. Started before the API client is made (its import is ~15 ms of the head start), with the
    switch interval at ``AHEAD_SWITCH_INTERVAL`` while the main thread imports and asks the API."""
    try:
        first = Path(paths[0])
        if not first.is_file() or first.stat().st_size < HASH_AHEAD_MIN:
            return False
    except (OSError, IndexError, ValueError):
        return False  # reported by the upload itself
    from filedock.client.blocking import hash_ahead

    return hash_ahead(first)


class _JsonLines:
    """``--json``: one object per file on stdout, as each file ends; no bars.

    For a download (``root`` given) each object also says where the file went; ``extra`` is added to
    every object (an upload's ``congestion_control``).
    """

    def __init__(self, root: Path | None = None, extra: dict[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._root = root
        self._extra = extra or {}

    def __enter__(self) -> "_JsonLines":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def progress(self, name: str, stage: str, done: int, total: int) -> None:
        pass

    def result(self, result: TransferResult) -> None:
        row = result.to_json() | self._extra
        if self._root is not None:
            from filedock.client.downloader import local_path

            path = local_path(self._root, result.name)
            row["path"] = str(path) if path is not None else None
        line = json.dumps(row, sort_keys=True)
        with self._lock:
            print(line, flush=True)


class _UploadBars:
    """One bar per file and one for the job: bytes, rate, time left (on stderr).

    With more than ``MANY`` files only the files in flight have a bar (a finished one
    gives way) and the job's bar counts the files done.
    """

    MANY = 20

    def __init__(self, plan: Any, verb: str = "resuming") -> None:
        self.bars = _progress_bars()
        self._lock = threading.Lock()
        self._verb = verb
        self._queued = {f.local.name for f in plan.files}
        self._done = {f.local.name: min(f.received, f.local.size) for f in plan.files}
        self._compact = len(plan.files) > self.MANY
        # a file is "queued" until its first bytes move: no made-up rate or time left behind a big one
        self._tasks = {f.local.name: self.bars.add_task(_mark(" ", f.local.name), total=f.local.size,
                                                        completed=self._done[f.local.name],
                                                        visible=not self._compact, queued=True)
                       for f in plan.files}
        self._count, self._finished = len(plan.files), 0
        self._job_label = f"[bold]job {_label(plan.job['name'])}"
        self._job = self.bars.add_task(self._job_description(), total=plan.total_bytes,
                                       completed=sum(self._done.values()))

    def _job_description(self) -> str:
        return f"{self._job_label} ({self._finished}/{self._count} files)" if self._compact else self._job_label

    def __enter__(self) -> "_UploadBars":
        self.bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.stop()

    def progress(self, name: str, stage: str, done: int, total: int) -> None:
        task = self._tasks[name]
        if stage == SENT:
            with self._lock:
                delta, self._done[name] = done - self._done[name], done
                starting = name in self._queued
                self._queued.discard(name)
            if starting and 0 < done < total:  # said when it starts, not only in the final table
                from rich.filesize import decimal
                from rich.markup import escape

                self.bars.console.print(f"{self._verb} {escape(name)} from {decimal(done)} "
                                        f"of {decimal(total)}", soft_wrap=True)
            self.bars.update(task, completed=done, visible=True, queued=False)
            self.bars.advance(self._job, delta)
        elif stage == VERIFIED:
            self.bars.update(task, description=_mark("[green]✓[/]", name), visible=not self._compact,
                             queued=False)

    def result(self, result: TransferResult) -> None:
        with self._lock:
            self._finished += 1
        self.bars.update(self._job, description=self._job_description())
        if result.state != "complete":  # failures stay in sight
            self.bars.update(self._tasks[result.name], description=_mark("[red]✗[/]", result.name),
                             visible=True, queued=False)


def _mark(mark: str, name: str) -> str:
    """A bar's description: a one-cell mark (blank, ✓ or ✗), so finishing never shifts the columns."""
    return f"{mark} {_label(name)}"


def _progress_bars():
    """Bars on stderr: name, bar, bytes, rate, time left; a file not started yet says ``queued``."""
    from rich.filesize import decimal
    from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    from rich.text import Text

    class WhenStarted(ProgressColumn):
        """``inner`` for a task that has started; ``queued`` (or nothing) for one that waits."""

        def __init__(self, inner: ProgressColumn, waiting: Callable[[Any], str]) -> None:
            super().__init__()
            self.inner, self.waiting = inner, waiting

        def render(self, task: Any) -> Any:
            if task.fields.get("queued") and not task.finished:
                return Text(self.waiting(task), style="dim")
            if task.finished and isinstance(self.inner, TransferSpeedColumn) and task.finished_speed is None:
                return Text("")  # done in one step: no rate to show, and "?" reads like a fault
            return self.inner.render(task)

    return Progress(TextColumn("{task.description}"),
                    WhenStarted(BarColumn(), lambda t: "queued".center(40)),
                    WhenStarted(DownloadColumn(), lambda t: decimal(int(t.total or 0))),
                    WhenStarted(TransferSpeedColumn(), lambda t: ""),
                    WhenStarted(TimeRemainingColumn(), lambda t: ""), console=_stderr_console())


def _label(name: str, width: int = 40) -> str:
    from rich.markup import escape

    return escape(name if len(name) <= width else "…" + name[-(width - 1):])


def _print_summary(console: Any, job: dict[str, Any], results: list[TransferResult], verb: str = "sent") -> None:
    from rich.filesize import decimal
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"job {job['name']} ({job['id']})"))
    for column in ("file", "size", "state", "resumed from", verb, "crc32", "digest"):
        # fold, never cut: a narrow or piped terminal still shows every file's whole name
        table.add_column(column, justify="right" if column in ("size", "resumed from", verb) else "left",
                         overflow="fold")
    many = len(results) > _UploadBars.MANY
    for r in results:
        ok = r.state == "complete"
        if many and ok:
            continue  # a long job lists what went wrong; the caption counts the rest
        table.add_row(escape(r.name), decimal(r.size), f"[green]{r.state}[/]" if ok else f"[red]{r.state}[/]",
                      decimal(r.resumed_from), decimal(r.sent), r.to_json()["crc32"] or "-",
                      (r.digest[:16] + "…") if r.digest else "-")
    total = sum(r.size for r in results)
    sent = sum(r.sent for r in results)
    complete = sum(r.state == "complete" for r in results)
    table.caption = (f"{complete}/{len(results)} files complete, {decimal(total)} in the job, "
                     f"{decimal(sent)} {verb} now")
    if many and complete == len(results):  # nothing to list: just the totals
        console.print(f"job {escape(job['name'])} ({job['id']}): {table.caption}")
    else:
        console.print(table)


# ---------------------------------------------------------------- download


@_local_errors
def cmd_download(args: argparse.Namespace) -> int:
    api_client = args.services.api_client
    if args.all:
        if len(args.targets) != 1:
            raise ValueError("download --all takes one directory: filedock download --job JOB --all DIR")
        return _download_job(api_client(args), args, Path(args.targets[0]))
    if len(args.targets) != 2:
        raise ValueError("download takes a file name and where to write it: "
                         "filedock download --job JOB NAME DEST (or --all DIR)")
    args.name, args.dest = args.targets[0], Path(args.targets[1])
    api = api_client(args)
    job = api.job(args.job)
    record = next((f for f in job.get("files", []) if f["name"] == args.name), None)
    if record is None:
        raise FiledockError(ErrorCode.NOT_FOUND, f"job {job['name']!r} has no file named {args.name!r}")
    if record["state"] != "complete":
        raise FiledockError(ErrorCode.NOT_COMPLETE, f"{args.name!r} is not complete yet "
                                                    f"({record['received']} of {record['size']} bytes)")
    dest = args.dest / PurePosixPath(args.name).name if args.dest.is_dir() else args.dest
    result = _local_copy(record, dest, args.force)
    if result is None:
        data = _data_client(api, args)
        session = api.open_session(job["id"])
        try:
            result = _download_with_bar(data, session["key"], record, dest, quiet=args.json)
        except (Cancelled, KeyboardInterrupt):
            print(f"cancelled: {dest}.part is kept; run the same command again to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            try:
                api.close_session(session["key"])
            except FiledockError:
                pass  # it expires on its own
    result.name = args.name
    if args.json:
        print(json.dumps(result.to_json() | {"path": str(dest)}, sort_keys=True))
    else:
        print(f"{args.name} -> {dest}: {result.size} bytes, crc32 {result.to_json()['crc32']}, "
              f"digest {result.digest} (verified; {result.sent} bytes received, {result.resumed_from} resumed)")
    return 0


def _local_copy(record: dict[str, Any], dest: Path, force: bool) -> TransferResult | None:
    """DEST already there: a result if it has the job's bytes (verified, nothing fetched), None to fetch;
    ``conflict`` if it holds other bytes and ``--force`` was not given (as ``--all`` refuses)."""
    from filedock.client.downloader import local_copy

    return local_copy(record, dest, replace=force)


def _download_job(api: Any, args: argparse.Namespace, dest: Path) -> int:
    """``download --all``: every complete file of the job into ``dest``, one after another."""
    from filedock.client.downloader import JobDownloader

    downloader = JobDownloader(api, _data_client(api, args), replace=args.force)
    record = api.job(args.job)
    view = _JsonLines(dest) if args.json else _UploadBars(_DownloadPlan(record))
    try:
        with view:
            job, results = downloader.download(args.job, dest, progress=view.progress, cancel=threading.Event(),
                                               on_result=view.result, record=record)
    except (Cancelled, KeyboardInterrupt):
        print("cancelled: the file in flight keeps its .part; run the same command again to resume",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    failed = [r for r in results if r.state != "complete"]
    for r in failed:
        _print_error(r.state, r.message or f"{r.name}: not downloaded")
    if not args.json:
        _print_summary(args.services.stdout_console(), job, results, verb="received")
    return EXIT_FAILED if failed else 0


class _DownloadPlan:
    """What ``_UploadBars`` needs of a job to be downloaded: its files, none held yet."""

    def __init__(self, job: dict[str, Any]) -> None:
        from types import SimpleNamespace

        self.job = job
        self.files = [SimpleNamespace(local=SimpleNamespace(name=f["name"], size=f["size"]), received=0)
                      for f in job.get("files", [])]
        self.total_bytes = sum(f["size"] for f in job.get("files", []))


def _download_with_bar(data: Any, session_key: str, record: dict[str, Any], dest: Path,
                       quiet: bool) -> TransferResult:
    if quiet:
        return data.download_file(session_key, record["key"], dest, cancel=threading.Event())
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    bars = _progress_bars()
    task = bars.add_task(_mark(" ", record["name"]), total=record["size"])
    first = [True]

    def progress(stage: str, done: int, total: int) -> None:
        if stage == SENT:
            if first[0] and 0 < done < total:
                from rich.filesize import decimal
                from rich.markup import escape

                bars.console.print(f"resuming {escape(record['name'])} from {decimal(done)} of {decimal(total)}",
                                   soft_wrap=True)
            first[0] = False
            bars.update(task, completed=done, total=total)
        elif stage == VERIFIED:
            bars.update(task, description=_mark("[green]✓[/]", record["name"]))

    with bars:
        return data.download_file(session_key, record["key"], dest, progress=progress, cancel=threading.Event())


# ---------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    payload = args.services.api_client(args).get("/v1/uploads")
    uploads = payload.get("uploads", []) if isinstance(payload, dict) else payload
    console = args.services.stdout_console
    args.services.emit(args, {"uploads": uploads}, lambda shown: _print_uploads(console(), shown))
    return 0


def _print_uploads(console: Any, payload: dict[str, Any]) -> None:
    from rich.filesize import decimal
    from rich.markup import escape
    from rich.table import Table

    uploads = payload["uploads"]
    if not uploads:
        console.print("no uploads in progress")
        return
    table = Table("job", "file", "key", "received", "size", "%", "resumed from", "rate", "seconds")
    for column in table.columns:
        column.overflow = "fold"
    for u in uploads:
        size, received, seconds = u.get("size", 0), u.get("received", 0), u.get("seconds", 0.0)
        rate = (received - u.get("resumed_from", 0)) / seconds if seconds else 0.0
        job = u.get("job_name") or str(u.get("job", ""))[:8]
        table.add_row(escape(job), escape(str(u.get("name", ""))), str(u.get("key", "")), decimal(received),
                      decimal(size), f"{100 * received / size:.1f}" if size else "100.0",
                      decimal(u.get("resumed_from", 0)), f"{decimal(int(rate))}/s", f"{seconds:.0f}")
    console.print(table)
