"""Downloading a whole job into a local directory: ``filedock download --job J --all DIR``.

Every complete file of the job goes to ``DIR/<its name>``, names with ``/`` making
subdirectories, one file after another, each resumable (``.part``) and verified
like a single download. Running the same command again resumes: a file already
there with the server's size and digest is verified, not fetched again. A local
file of that name with other bytes is never overwritten (``conflict``). Names come
from the server, so each is checked before it becomes a path: no absolute names,
no empty, ``.`` or ``..`` components, no NUL; anything else is refused for that
file alone (``bad-request``), and nothing is ever written outside ``DIR``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from filedock.client.blocking import DataPortClient, hash_stream_cancellable
from filedock.client.http import ApiClient
from filedock.client.model import DURABLE, SENT, VERIFIED, Cancelled, UploadResult
from filedock.errors import ErrorCode, FiledockError
from filedock.wire import format_crc

JobProgress = Callable[[str, str, int, int], None]
ResultCallback = Callable[[UploadResult], None]


def local_path(root: Path, name: str) -> Path | None:
    """Where file ``name`` of a job goes under ``root``, or None if the name cannot safely be a path."""
    if not name or "\0" in name or name.startswith("/"):
        return None
    parts = PurePosixPath(name).parts
    if not parts or any(part in ("", ".", "..") for part in name.split("/")):
        return None
    return root.joinpath(*parts)


class JobDownloader:
    """Downloads the complete files of a job into a directory (see the module docstring)."""

    def __init__(self, api: ApiClient, data_client: DataPortClient) -> None:
        self.api = api
        self.data_client = data_client

    def download(self, job: str, dest: str | os.PathLike, *, progress: JobProgress | None = None,
                 cancel: threading.Event | None = None, on_result: ResultCallback | None = None,
                 record: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[UploadResult]]:
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
        files = sorted(record.get("files", []), key=lambda f: f["name"])
        results: list[UploadResult] = []
        session = None
        try:
            for entry in files:
                path = local_path(root, entry["name"])
                if path is None:
                    result = self._failed(entry, ErrorCode.BAD_REQUEST,
                                          f"{entry['name']!r} cannot be a local path; download it alone "
                                          "with a name of your choice")
                elif entry["state"] != "complete":
                    result = self._failed(entry, ErrorCode.NOT_COMPLETE,
                                          f"{entry['name']}: not complete on the server yet "
                                          f"({entry.get('received', 0)} of {entry['size']} bytes)")
                else:
                    result = self._present(entry, path, report, cancel)
                    if result is None:
                        if session is None:
                            session = self.api.open_session(record["id"])
                        result = self._fetch(session["key"], entry, path, report, cancel)
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
        return record, results

    @staticmethod
    def _failed(entry: dict[str, Any], code: ErrorCode | str, message: str) -> UploadResult:
        state = code.value if isinstance(code, ErrorCode) else str(code)
        return UploadResult(entry["name"], entry["size"], entry["key"], state=state, message=message)

    @staticmethod
    def _present(entry: dict[str, Any], path: Path, report: JobProgress,
                 cancel: threading.Event) -> UploadResult | None:
        """A local file already at ``path``: verified against the server's values (None if there is none)."""
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return JobDownloader._failed(entry, ErrorCode.CONFLICT, f"{path}: {exc.strerror or exc}")
        with f:
            if os.fstat(f.fileno()).st_size == entry["size"]:
                hasher = hash_stream_cancellable(f, cancel)
                if (format_crc(hasher.crc32), hasher.hexdigest()) == (entry.get("crc32"), entry.get("digest")):
                    size = entry["size"]
                    for stage in (SENT, DURABLE, VERIFIED):
                        report(entry["name"], stage, size, size)
                    return UploadResult(entry["name"], size, entry["key"], resumed_from=size, sent=0,
                                        crc32=hasher.crc32, digest=hasher.hexdigest(), state="complete")
        return JobDownloader._failed(entry, ErrorCode.CONFLICT,
                                     f"{path} exists with other bytes; it is left alone (move it away to "
                                     "download the job's copy)")

    def _fetch(self, session_key: str, entry: dict[str, Any], path: Path, report: JobProgress,
               cancel: threading.Event) -> UploadResult:
        name = entry["name"]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            result = self.data_client.download_file(
                session_key, entry["key"], path, cancel=cancel,
                progress=lambda stage, done, total: report(name, stage, done, total))
        except FiledockError as exc:
            return self._failed(entry, exc.code, f"{name}: {exc.message}")
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
            # a name that is also a directory here, or one under a name that is a file
            return self._failed(entry, ErrorCode.CONFLICT, f"{exc.filename}: {exc.strerror}")
        except OSError as exc:  # the local disk: full, read-only, not ours
            return self._failed(entry, ErrorCode.INTERNAL_ERROR, f"{exc.filename or path}: {exc.strerror or exc}")
        result.name = name
        return result
