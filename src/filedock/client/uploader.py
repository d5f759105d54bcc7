"""The blocking job uploader: local files and directories into one job, resumably.

``JobUploader.upload`` is what ``filedock upload`` runs: find (or create) the job,
declare the files (reusing a declared file of the same name and size, which is how
a second run after a crash or Ctrl-C resumes), open a session, send the files one
after another or several at once, close the session. The data port's address comes
from ``GET /v1/info``, so callers only know the API URL.

File names are data on the server, never paths: a file given directly is named by
its last path component, a file found under a given directory by its path relative
to that directory, with ``/`` separators.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import ssl
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from filedock.client.blocking import DataPortClient, hash_stream_cancellable
from filedock.client.http import ApiClient
from filedock.client.model import DURABLE, SENT, VERIFIED, Cancelled, Outcome, SourceStamp, UploadResult
from filedock.errors import ErrorCode, FiledockError, LocalFileError
from filedock.wire import format_crc

log = logging.getLogger("filedock.client")

JobProgress = Callable[[str, str, int, int], None]
"""``progress(name, stage, done_bytes, total_bytes)`` for each file of a job."""

ResultCallback = Callable[[UploadResult], None]
"""Called once per file as soon as its result is known (from a worker thread when parallel)."""

DECLARE_BATCH = 1000
"""Most files declared in one API request (the API's own limit)."""

_ANY_ADDRESS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class LocalFile:
    """A file to upload: where it is here, what it is called in the job, how big it is, and its
    ``SourceStamp`` when found (the upload checks the file is still that version before committing)."""

    path: Path
    name: str
    size: int
    stamp: SourceStamp | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PlannedFile:
    """A local file matched to its declared file on the server, as the server saw it when planned.

    ``conflict`` says why it will not be sent (the job has that name with another size).
    """

    local: LocalFile
    key: str
    state: str
    received: int = 0
    crc32: str | None = None
    digest: str | None = None
    conflict: str | None = None


@dataclass(frozen=True)
class UploadPlan:
    """A resolved job and the files to put into it, in order."""

    job: dict[str, Any]
    files: list[PlannedFile]
    replace: bool = False  # a complete file with other bytes is uploaded as a new version, not a conflict

    @property
    def job_id(self) -> str:
        return self.job["id"]

    @property
    def total_bytes(self) -> int:
        return sum(f.local.size for f in self.files)


def check_prefix(prefix: str) -> str:
    """``--prefix``: a relative folder-like name put before every file's name, returned ending in ``/``
    (``""`` stays ``""``). Raises ``FiledockError(bad-request)`` for an absolute prefix or a ``..``,
    ``.`` or empty part."""
    if not prefix:
        return ""
    parts = prefix.rstrip("/").split("/")
    if prefix.startswith(("/", "\\")) or any(part in ("", ".", "..") for part in parts) or "\0" in prefix:
        raise FiledockError(ErrorCode.BAD_REQUEST, f"--prefix {prefix!r}: a relative name like 'sub1/' "
                                                   "(no leading /, no '.', '..' or empty parts)")
    return "/".join(parts) + "/"


def collect_files(paths: Iterable[str | os.PathLike], prefix: str = "") -> list[LocalFile]:
    """The regular files the paths name, directories expanded (sorted; symlinked directories not followed).

    Naming: a file given directly is named by its last path component; a file found
    under a given directory by its path relative to that directory (the directory's own
    name is not part of it, like ``rsync dir/``). ``prefix`` (see ``check_prefix``) goes
    before every name.

    Raises ``FiledockError(not-found)`` for a path that does not exist,
    ``FiledockError(bad-request)`` for a directory that cannot be read, and
    ``FiledockError(conflict)`` if two files would get the same name in the job.
    """
    prefix = check_prefix(prefix)
    found: list[LocalFile] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(LocalFile(f.path, prefix + f.name, f.size, f.stamp) for f in _walk(path))
        elif path.is_file():
            st = path.stat()
            found.append(LocalFile(path, prefix + path.name, st.st_size, SourceStamp.of(st)))
        elif path.exists():
            raise FiledockError(ErrorCode.BAD_REQUEST, f"{path}: not a regular file or directory")
        else:
            raise FiledockError(ErrorCode.NOT_FOUND, f"{path}: no such file or directory")
    seen: dict[str, Path] = {}
    for local in found:
        if local.name in seen:
            raise FiledockError(ErrorCode.CONFLICT, f"{seen[local.name]} and {local.path} would both be "
                                                    f"named {local.name!r} in the job")
        seen[local.name] = local.path
    return found


def _walk(root: Path) -> Iterable[LocalFile]:
    """A directory's files first, then its subdirectories, names sorted; one ``stat`` per file.

    A directory that cannot be read stops the walk with ``FiledockError(bad-request)``:
    leaving its files out without a word would lose them.
    """
    def unreadable(exc: OSError) -> None:
        raise FiledockError(ErrorCode.BAD_REQUEST, f"{exc.filename}: cannot read the directory: "
                                                   f"{exc.strerror or exc}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames.sort()  # symlinked directories are listed here but not followed
        relative = os.path.relpath(dirpath, root)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            try:
                st = os.stat(path)
            except (FileNotFoundError, OSError) as exc:
                if isinstance(exc, FileNotFoundError) or exc.errno == errno.ELOOP:
                    continue  # a dangling link or a loop of links, or gone while we looked
                raise
            if stat.S_ISREG(st.st_mode):  # sockets, FIFOs, devices: nothing to upload
                name = prefix + filename
                try:
                    name.encode("utf-8")
                except UnicodeError:  # bytes that are not UTF-8 cannot be a name in the job
                    raise FiledockError(ErrorCode.BAD_REQUEST, f"{path!r}: the file name is not valid UTF-8; "
                                                               "rename it to upload it") from None
                yield LocalFile(Path(path), name, st.st_size, SourceStamp.of(st))


def data_client_for(api: ApiClient, *, stall_timeout: float = 60.0, attempts: int = 5,
                    backoff: float = 0.5) -> DataPortClient:
    """A data-port client for the address the server gives in ``GET /v1/info``.

    A server listening on every interface reports an unspecified address; the API's
    host is used then. TLS on the data port reuses the API client's trust roots.
    """
    info = api.info()
    port = info.get("data_port") if isinstance(info, dict) else None
    if not isinstance(port, dict) or not isinstance(port.get("port"), int):
        raise FiledockError(ErrorCode.INTERNAL_ERROR, f"{api.url} did not say where its data port is "
                                                      "(no data_port in GET /v1/info)")
    host = port.get("host") or ""
    if host in _ANY_ADDRESS:
        host = api.host
    context = None
    if port.get("tls"):
        context = api.ssl_context or ssl.create_default_context()
    return DataPortClient(host, int(port["port"]), ssl_context=context, stall_timeout=stall_timeout,
                          attempts=attempts, backoff=backoff)


class JobUploader:
    """Uploads local files and directories into a job through the control API and the data port.

    ``data_client`` defaults to one built from ``GET /v1/info`` when first needed.
    """

    def __init__(self, api: ApiClient, data_client: DataPortClient | None = None) -> None:
        self.api = api
        self.data_client = data_client

    def upload(self, job: str, paths: list[Path], *, create: bool = False, parallel: int = 1,
               progress: JobProgress | None = None, cancel: threading.Event | None = None,
               prefix: str = "", replace: bool = False) -> list[UploadResult]:
        """Upload ``paths`` into ``job`` (an id or a name); one result per file, in order.

        A file that fails gets a result whose ``state`` is the error code (and
        ``message`` says why); the others carry on. That includes a ``conflict``: a file
        whose name the job has with another size, or complete with other bytes. Raises
        ``FiledockError`` when the job cannot be resolved or the files cannot be declared,
        ``Cancelled`` on ``cancel.set()`` or Ctrl-C (the server keeps the partials: run
        again to resume). ``prefix`` goes before every name (``collect_files``).

        ``replace``: a conflicting file is uploaded as a new version instead, which takes
        the old one's place on the server only once it is complete and verified (the old
        one stays meanwhile; an interrupted replacement resumes on the next run).
        """
        plan = self.prepare(job, paths, create=create, prefix=prefix, replace=replace)
        return self.run(plan, parallel=parallel, progress=progress, cancel=cancel)

    # ------------------------------------------------------------ planning

    def prepare(self, job: str, paths: Iterable[str | os.PathLike], *, create: bool = False,
                prefix: str = "", replace: bool = False) -> UploadPlan:
        """Resolve the job, find the local files and declare those the job lacks; a file whose name the job
        has with another size is planned as a ``conflict`` (not sent, the others are), or with ``replace``
        declared as a new version of that file."""
        local = collect_files(paths, prefix)
        record = self._resolve_job(job, create)
        conflicts: dict[str, str] = {}
        declared, missing = undeclared(record, local, conflicts)
        self._declare(record["id"], missing, declared)
        if replace and conflicts:
            self._declare(record["id"], [f for f in local if f.name in conflicts], declared, replace=True)
            conflicts = {}
        files = [_planned(item, declared[item.name], conflicts.get(item.name)) for item in local]
        return UploadPlan(record, files, replace)

    def _declare(self, job_id: str, files: list[LocalFile], declared: dict[str, dict[str, Any]],
                 replace: bool = False) -> None:
        for start in range(0, len(files), DECLARE_BATCH):
            batch = files[start:start + DECLARE_BATCH]
            records = self.api.add_files(job_id, [(f.name, f.size) for f in batch], replace=replace)
            declared.update((f["name"], f) for f in records)

    def _resolve_job(self, job: str, create: bool) -> dict[str, Any]:
        try:
            return self.api.job(job)
        except FiledockError as exc:
            if exc.code is not ErrorCode.NOT_FOUND:
                raise
            if not create:
                raise FiledockError(ErrorCode.NOT_FOUND, f"no job {job!r}; create it with --create") from None
        created = self.api.create_job(job)
        log.info("created job %s (%s)", job, created["id"])
        return {"files": [], **created}  # a job just made has no files (one a lost attempt made may list some)

    # ------------------------------------------------------------ running

    def run(self, plan: UploadPlan, *, parallel: int = 1, progress: JobProgress | None = None,
            cancel: threading.Event | None = None, on_result: ResultCallback | None = None) -> list[UploadResult]:
        """Upload a prepared plan: ``parallel`` files at once (1: one after another, as in 2007).

        ``on_result`` hears of each file as soon as it ends. Ctrl-C becomes ``Cancelled``.
        """
        try:
            return self._run(plan, parallel, progress, cancel if cancel is not None else threading.Event(),
                             on_result)
        except KeyboardInterrupt:
            raise Cancelled("interrupted") from None

    def _run(self, plan: UploadPlan, parallel: int, progress: JobProgress | None, cancel: threading.Event,
             on_result: ResultCallback | None) -> list[UploadResult]:
        report: JobProgress = progress or (lambda name, stage, done, total: None)
        done: ResultCallback = on_result or (lambda result: None)
        results: dict[int, UploadResult] = {}
        todo = []
        for i, planned in enumerate(plan.files):
            if planned.conflict is not None:
                results[i] = UploadResult.failed(planned.local.name, planned.local.size, planned.key,
                                                 FiledockError(ErrorCode.CONFLICT, planned.conflict))
                done(results[i])
            elif planned.state == "complete":
                results[i] = self._verify_complete(planned, report, cancel)
                if results[i].outcome is Outcome.CONFLICT and plan.replace:
                    todo.append(i)  # same size, other bytes: a new version goes up below
                    continue
                done(results[i])
            else:
                todo.append(i)
        newer = [i for i in todo if plan.files[i].state == "complete"]
        if newer:
            plan = self._new_versions(plan, newer)
        if todo:
            data = self.data_client or self._default_data_client()
            limits = self._limits()
            session = self.api.open_session(plan.job_id)
            try:
                def run_unit(unit: list[int]) -> dict[int, UploadResult]:
                    if len(unit) > 1:
                        out = self._upload_batch(data, session["key"], [plan.files[i] for i in unit], report,
                                                 cancel)
                        got = dict(zip(unit, out))
                    else:
                        got = {unit[0]: self._upload_one(data, session["key"], plan.files[unit[0]], report, cancel)}
                    for result in got.values():
                        done(result)
                    return got

                units = _units(plan, todo, limits, parallel)
                if parallel > 1:
                    parallel = min(parallel, len(units), self._connections_per_session(limits))
                if parallel <= 1:
                    for unit in units:
                        results.update(run_unit(unit))
                else:
                    results.update(_run_threads(run_unit, units, parallel, cancel))
            finally:
                self._close_session(session["key"])
        return [results[i] for i in range(len(plan.files))]

    def _new_versions(self, plan: UploadPlan, indexes: list[int]) -> UploadPlan:
        """The plan with these complete-but-different files declared as new versions to upload."""
        declared: dict[str, dict[str, Any]] = {}
        self._declare(plan.job_id, [plan.files[i].local for i in indexes], declared, replace=True)
        files = list(plan.files)
        for i in indexes:
            files[i] = _planned(files[i].local, declared[files[i].local.name])
        return UploadPlan(plan.job, files, plan.replace)

    def _limits(self) -> dict[str, Any]:
        limits = self.api.info().get("limits")
        return limits if isinstance(limits, dict) else {}

    @staticmethod
    def _upload_batch(data: DataPortClient, session_key: str, planned: list[PlannedFile], report: JobProgress,
                      cancel: threading.Event) -> list[UploadResult]:
        try:
            return data.upload_batch(session_key, [(p.key, p.local.path, p.local.name) for p in planned],
                                     progress=report, cancel=cancel,
                                     stamps={p.key: p.local.stamp for p in planned if p.local.stamp})
        except FiledockError as exc:
            return [UploadResult.failed(p.local.name, p.local.size, p.key, exc) for p in planned]
        except OSError as exc:  # a local file: unreadable, gone
            error = LocalFileError.of(exc)
            return [UploadResult.failed(p.local.name, p.local.size, p.key, error) for p in planned]

    @staticmethod
    def _connections_per_session(limits: dict[str, Any]) -> int:
        """The server's ``max_connections_per_session``: more threads would only be refused."""
        value = limits.get("max_connections_per_session")
        return value if isinstance(value, int) and value > 0 else 1 << 30

    def _default_data_client(self) -> DataPortClient:
        self.data_client = data_client_for(self.api)
        return self.data_client

    @staticmethod
    def _upload_one(data: DataPortClient, session_key: str, planned: PlannedFile, report: JobProgress,
                    cancel: threading.Event) -> UploadResult:
        local = planned.local
        try:
            return data.upload_file(session_key, planned.key, local.path, name=local.name, cancel=cancel,
                                    progress=lambda stage, done, total: report(local.name, stage, done, total),
                                    expect=local.stamp)
        except FiledockError as exc:
            return UploadResult.failed(local.name, local.size, planned.key, exc)
        except OSError as exc:  # the local file: unreadable, gone
            return UploadResult.failed(local.name, local.size, planned.key,
                                       LocalFileError(f"{local.path}: {exc.strerror or exc}"))

    @staticmethod
    def _verify_complete(planned: PlannedFile, report: JobProgress, cancel: threading.Event) -> UploadResult:
        """A file the server holds complete: hash the local one and compare, send nothing."""
        local = planned.local
        try:
            with open(local.path, "rb", buffering=0) as f:
                hasher = hash_stream_cancellable(f, cancel)
        except OSError as exc:
            return UploadResult.failed(local.name, local.size, planned.key,
                                       LocalFileError(f"{local.path}: {exc.strerror or exc}"))
        return compare_complete(local, planned.key, planned.crc32, planned.digest, hasher, report)

    def _close_session(self, key: str) -> None:
        try:
            self.api.close_session(key)
        except FiledockError as exc:  # the uploads' outcome stands; an unclosed session just expires
            log.warning("could not close session: %s", exc)


def undeclared(job: dict[str, Any], local: list[LocalFile], conflicts: dict[str, str] | None = None,
               ) -> tuple[dict[str, dict[str, Any]], list[LocalFile]]:
    """The job's declared files by name, and the local files it has not declared yet.

    A local file whose name the job has with another size is a conflict: its message goes
    into ``conflicts`` (by name) if given, else ``FiledockError(conflict)`` is raised.
    """
    declared = {f["name"]: f for f in job.get("files", [])}
    missing = []
    for item in local:
        existing = declared.get(item.name)
        if existing is None:
            missing.append(item)
        elif existing["size"] != item.size:
            message = (f"{item.name}: the local file differs from the job's copy: job {job['name']!r} has "
                       f"{existing['size']} bytes under that name, {item.path} has {item.size}. Upload it under "
                       "another name (--prefix), or with --replace to store it as a new version")
            if conflicts is None:
                raise FiledockError(ErrorCode.CONFLICT, message)
            conflicts[item.name] = message
    return declared, missing


def compare_complete(local: LocalFile, key: str, crc32: str | None, digest: str | None, hasher: Any,
                     report: JobProgress) -> UploadResult:
    """The result for a file the server holds complete (CRC-32 ``crc32`` as the API shows it, ``digest``),
    given the local file's hasher: ``complete`` if they agree, else ``digest-mismatch``; nothing is sent."""
    result = UploadResult(local.name, local.size, key, resumed_from=local.size, sent=0,
                          crc32=hasher.crc32, digest=hasher.hexdigest())
    report(local.name, SENT, local.size, local.size)
    report(local.name, DURABLE, local.size, local.size)
    if (format_crc(hasher.crc32), result.digest, hasher.offset) != (crc32, digest, local.size):
        # the same size, other bytes: the user changed the file since it was uploaded (not a transfer fault)
        result.outcome, result.code = Outcome.CONFLICT, ErrorCode.CONFLICT
        result.message = (f"{local.name}: the local file differs from the job's copy (same size, other bytes: "
                          f"the job's has CRC-32 {crc32}, {local.path} has {format_crc(hasher.crc32)}). Upload it "
                          "under another name (--prefix), or with --replace to store it as a new version")
        return result
    report(local.name, VERIFIED, local.size, local.size)
    result.outcome = Outcome.COMPLETE
    return result


def _planned(local: LocalFile, record: dict[str, Any], conflict: str | None = None) -> PlannedFile:
    return PlannedFile(local, record["key"], record["state"], record.get("received", 0),
                       record.get("crc32"), record.get("digest"), conflict)


def _units(plan: UploadPlan, todo: list[int], limits: dict[str, Any], parallel: int = 1) -> list[list[int]]:
    """Work units of the plan's files ``todo`` (see ``batch_units``), as indexes into ``plan.files``."""
    units = batch_units([plan.files[i].local.size for i in todo], limits, parallel)
    return [[todo[j] for j in unit] for unit in units]


def batch_units(sizes: list[int], limits: dict[str, Any], parallel: int = 1) -> list[list[int]]:
    """Work units for files of these sizes, in order, as lists of indexes into ``sizes``: small files
    grouped into batches (one connection each) within the server's ``batch_*`` limits (from
    ``GET /v1/info``), every other file alone. A server that does not say it batches gets every file alone.

    With ``parallel`` > 1 the small files are spread over at least that many batches,
    so the connections share them.
    """
    item_max, max_files, max_bytes = (limits.get(k) for k in ("batch_item_max", "batch_max_files",
                                                              "batch_max_bytes"))
    if not all(isinstance(v, int) and v > 0 for v in (item_max, max_files, max_bytes)):
        return [[i] for i in range(len(sizes))]
    small = sum(1 for size in sizes if size <= item_max)
    max_files = max(1, min(max_files, -(-small // max(1, parallel))))
    units: list[list[int]] = []
    batch: list[int] = []
    batch_bytes = 0
    for i, size in enumerate(sizes):
        if size > item_max:
            units.append([i])
            continue
        if batch and (len(batch) >= max_files or batch_bytes + size > max_bytes):
            units.append(batch)
            batch, batch_bytes = [], 0
        batch.append(i)
        batch_bytes += size
    if batch:
        units.append(batch)
    return sorted(units, key=lambda unit: unit[0])  # in the order the files were given, as far as can be


def _run_threads(one: Callable[[list[int]], dict[int, UploadResult]], units: list[list[int]], parallel: int,
                 cancel: threading.Event) -> dict[int, UploadResult]:
    """``one(unit)`` for each unit on ``parallel`` threads; a cancel (or Ctrl-C here) stops them all."""
    results: dict[int, UploadResult] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(parallel, len(units)),
                                                 thread_name_prefix="filedock-upload")
    futures = [pool.submit(one, unit) for unit in units]
    try:
        pending = set(futures)
        while pending:
            finished, pending = concurrent.futures.wait(pending, timeout=0.5,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                results.update(future.result())
    except Cancelled:
        cancel.set()
    except KeyboardInterrupt:
        cancel.set()
        raise Cancelled("interrupted") from None
    except BaseException:
        cancel.set()  # a bug in one worker: stop the others rather than leave them running
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=cancel.is_set())
    if cancel.is_set():
        raise Cancelled("cancelled")
    return results
