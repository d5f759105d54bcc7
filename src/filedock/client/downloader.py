"""Downloading a whole job into a local directory: ``filedock download --job J --all DIR``.

Every complete file of the job goes to ``DIR/<its name>``, names with ``/`` making
subdirectories, one file after another, each resumable (``.part``) and verified
like a single download. Running the same command again resumes: a file already
there with the server's size and digest is verified, not fetched again. A local
file of that name with other bytes is never overwritten (``conflict``). Names come
from the server, so each is checked before it becomes a path: no absolute names,
no empty, ``.`` or ``..`` components, no NUL; anything else is refused for that
file alone (``bad-request``), and nothing is ever written outside ``DIR``: symbolic
links inside ``DIR`` are never followed (a file or directory on the way that is one
is refused, ``conflict``). Partial downloads live in ``DIR/.filedock-partial/``,
named by the server's file key, so they can clash neither with the user's files nor
with the job's; that name is reserved.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from filedock.client.blocking import DataPortClient, hash_stream_cancellable
from filedock.client.http import ApiClient
from filedock import durability
from filedock.client.model import DURABLE, SENT, VERIFIED, Cancelled, DownloadResult, Outcome
from filedock.errors import ErrorCode, FiledockError
from filedock.wire import format_crc

PARTIAL_DIR = ".filedock-partial"
"""Where partial downloads wait, under the target directory (a name the job's files may not use)."""

_KEY = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class _Refused(Exception):
    """This one file cannot be downloaded: (code, message). ``other_bytes``: only because a regular
    file of that name holds other bytes (what ``--force`` replaces)."""

    def __init__(self, code: ErrorCode, message: str, other_bytes: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.other_bytes = code, message, other_bytes


def local_copy(entry: dict[str, Any], path: Path, *, replace: bool = False,
               progress: JobProgress | None = None, cancel: threading.Event | None = None) -> DownloadResult | None:
    """A local file at ``path`` checked against the job's file ``entry`` (as ``GET /v1/jobs/<job>`` lists it).

    -> a ``complete`` result if it has the server's size and digest (nothing to fetch),
    None if there is no file there (or it holds other bytes and ``replace`` is set: fetch it
    and rename over). Raises ``FiledockError(conflict)`` for other bytes without
    ``replace``, and for a symbolic link or a non-regular file (never followed or replaced).
    """
    try:
        return JobDownloader._present(entry, path, progress or (lambda name, stage, done, total: None),
                                      cancel if cancel is not None else threading.Event())
    except _Refused as exc:
        if exc.other_bytes and replace:
            return None
        raise FiledockError(exc.code, exc.message) from None

JobProgress = Callable[[str, str, int, int], None]
ResultCallback = Callable[[DownloadResult], None]


def local_path(root: Path, name: str) -> Path | None:
    """Where file ``name`` of a job goes under ``root``, or None if the name cannot safely be a path."""
    if not name or "\0" in name or name.startswith("/"):
        return None
    parts = PurePosixPath(name).parts
    if not parts or any(part in ("", ".", "..") for part in name.split("/")) or parts[0] == PARTIAL_DIR:
        return None
    return root.joinpath(*parts)


class JobDownloader:
    """Downloads the complete files of a job into a directory (see the module docstring)."""

    def __init__(self, api: ApiClient, data_client: DataPortClient, replace: bool = False) -> None:
        self.api = api
        self.data_client = data_client
        self.replace = replace  # a regular local file with other bytes is replaced (atomically), not refused

    def download(self, job: str, dest: str | os.PathLike, *, progress: JobProgress | None = None,
                 cancel: threading.Event | None = None, on_result: ResultCallback | None = None,
                 record: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[DownloadResult]]:
        """Download every file of ``job`` (an id or a name) into ``dest`` -> (the job, one result per file).

        A file that could not be downloaded has a result whose ``state`` is the error
        code (``not-complete`` for one still uploading); the others carry on.
        ``record`` is the job as ``GET /v1/jobs/<job>`` gave it, if the caller has it.
        ``Cancelled`` on ``cancel.set()`` or Ctrl-C: the ``.part`` of the file in flight
        is kept, and the same call resumes it.
        """
        report: JobProgress = progress or (lambda name, stage, done, total: None)
        done: ResultCallback = on_result or (lambda result: None)
        cancel = cancel if cancel is not None else threading.Event()
        root = Path(dest)
        if root.exists() and not root.is_dir():
            raise FiledockError(ErrorCode.BAD_REQUEST, f"{root} is not a directory")
        record = record if record is not None else self.api.job(job)
        files = [f for f in record.get("files", []) if isinstance(f, dict)]
        files.sort(key=lambda f: str(f.get("name")))
        results: list[DownloadResult] = []
        session = None
        try:
            for entry in files:
                try:
                    result = self._one(root, entry, report, cancel)
                    if result is None:  # to fetch
                        if session is None:
                            session = self.api.open_session(record["id"])
                        result = self._fetch(root, session["key"], entry, report, cancel)
                except _Refused as exc:
                    result = self._failed(entry, exc.code, exc.message)
                results.append(result)
                done(result)
        except KeyboardInterrupt:
            raise Cancelled("interrupted") from None
        finally:
            if session is not None:
                try:
                    self.api.close_session(session["key"])
                except FiledockError:
                    pass  # it expires on its own
            try:
                os.rmdir(root / PARTIAL_DIR)  # only if no partial is left in it
            except OSError:
                pass
        return record, results

    @staticmethod
    def _failed(entry: dict[str, Any], code: ErrorCode | str, message: str) -> DownloadResult:
        name, size, key = entry.get("name"), entry.get("size"), entry.get("key")
        return DownloadResult.failed(name if isinstance(name, str) else repr(name),
                                     size if isinstance(size, int) else 0, key if isinstance(key, str) else "",
                                     FiledockError(code, message))

    def _one(self, root: Path, entry: dict[str, Any], report: JobProgress,
             cancel: threading.Event) -> DownloadResult | None:
        """A file's result without fetching it (refused, not complete, already here), or None to fetch it."""
        name, size, key = entry.get("name"), entry.get("size"), entry.get("key")
        if not (isinstance(name, str) and isinstance(size, int) and isinstance(key, str) and _KEY.fullmatch(key)):
            raise _Refused(ErrorCode.BAD_REQUEST, f"the server's entry {entry!r:.200} is not a file this "
                                                  "client understands")
        try:
            name.encode("utf-8")
        except UnicodeError:
            raise _Refused(ErrorCode.BAD_REQUEST, f"{name!r} cannot be a local file name") from None
        if local_path(root, name) is None:
            raise _Refused(ErrorCode.BAD_REQUEST, f"{name!r} cannot be a local path; download it alone with a "
                                                  "name of your choice")
        if entry.get("state") != "complete":
            raise _Refused(ErrorCode.NOT_COMPLETE, f"not complete on the server yet "
                                                   f"({entry.get('received', 0)} of {size} bytes)")
        try:
            return self._present(entry, _existing_path(root, name), report, cancel)
        except _Refused as exc:
            if exc.other_bytes and self.replace:
                return None  # fetched to the partial, verified, then renamed over it
            raise

    @staticmethod
    def _present(entry: dict[str, Any], path: Path | None, report: JobProgress,
                 cancel: threading.Event) -> DownloadResult | None:
        """A local file already at ``path``: verified against the server's values (None if there is none)."""
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Refused(ErrorCode.CONFLICT, f"{path} is a symbolic link; it is not followed") from None
            raise _Refused(ErrorCode.INTERNAL_ERROR, f"{path}: {exc.strerror or exc}") from None
        with open(fd, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _Refused(ErrorCode.CONFLICT, f"{path} is there and is not a regular file; it is left alone")
            if st.st_size == entry["size"]:
                hasher = hash_stream_cancellable(f, cancel)
                if (format_crc(hasher.crc32), hasher.hexdigest()) == (entry.get("crc32"), entry.get("digest")):
                    size = entry["size"]
                    for stage in (SENT, DURABLE, VERIFIED):
                        report(entry["name"], stage, size, size)
                    return DownloadResult(entry["name"], size, entry["key"], resumed_from=size, sent=0,
                                          crc32=hasher.crc32, digest=hasher.hexdigest(), outcome=Outcome.COMPLETE)
        raise _Refused(ErrorCode.CONFLICT, f"{path} exists with other bytes; it is left alone (move it away to "
                                           "download the job's copy, or pass --force to replace it)", other_bytes=True)

    def _fetch(self, root: Path, session_key: str, entry: dict[str, Any], report: JobProgress,
               cancel: threading.Event) -> DownloadResult:
        name = entry["name"]
        try:
            path, made = _make_parents(root, name)
            partial_dir, made_partial = _make_parents(root, f"{PARTIAL_DIR}/{entry['key']}")
            result = self.data_client.download_file(
                session_key, entry["key"], path, cancel=cancel, part=partial_dir,
                progress=lambda stage, done, total: report(name, stage, done, total))
            for directory in made:  # new directories on the way must survive a crash too
                durability.fsync_dir(directory.parent)
        except FiledockError as exc:
            raise _Refused(exc.code, exc.message) from None
        except OSError as exc:  # the local disk: full, read-only, not ours
            if exc.errno == errno.ELOOP:
                raise _Refused(ErrorCode.CONFLICT, f"{exc.filename}: a symbolic link; it is not followed") from None
            raise _Refused(ErrorCode.INTERNAL_ERROR, f"{exc.filename or name}: {exc.strerror or exc}") from None
        result.name = name
        return result


def _existing_path(root: Path, name: str) -> Path | None:
    """``name``'s path under ``root`` if every directory on the way exists and none is a symbolic link;
    None if one is missing (nothing there yet). Refuses a link or a non-directory on the way."""
    path = local_path(root, name)
    current = root
    for part in path.relative_to(root).parts[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise _Refused(ErrorCode.CONFLICT, f"{current} is a symbolic link; it is not followed")
        if not stat.S_ISDIR(st.st_mode):
            raise _Refused(ErrorCode.CONFLICT, f"{current} is not a directory")
    return path


def _make_parents(root: Path, relative: str) -> tuple[Path, list[Path]]:
    """The path of ``relative`` under ``root``, its directories made as needed (never through a link):
    (the path, the directories made)."""
    path = root.joinpath(*PurePosixPath(relative).parts)
    root.mkdir(parents=True, exist_ok=True)
    made = []
    current = root
    for part in path.relative_to(root).parts[:-1]:
        current = current / part
        try:
            os.mkdir(current)
            made.append(current)
        except FileExistsError:
            st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode):
                raise _Refused(ErrorCode.CONFLICT, f"{current} is a symbolic link; it is not followed") from None
            if not stat.S_ISDIR(st.st_mode):
                raise _Refused(ErrorCode.CONFLICT, f"{current} is not a directory") from None
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise _Refused(ErrorCode.CONFLICT, f"{path} is a symbolic link; it is not followed")
    except FileNotFoundError:
        pass
    return path, made
