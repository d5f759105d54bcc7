"""Planning an upload into a job, the same for every client: which local files, under which names,
declared how, verified or sent in which units, and what one file's failure does to the rest.

``collect_files`` finds the files and names them; ``undeclared`` matches them with the
job's declared files; ``UploadPlan`` is the result; ``JobPlan`` runs it as a sans-IO
state object (``start``, ``verified``, ``declared_new_versions``, ``units``,
``finished``), so ``JobUploader`` (blocking) and ``upload_job`` (Twisted) only do the
I/O it asks for.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Iterable

from filedock.client.model import DURABLE, SENT, VERIFIED, Outcome, SourceStamp, UploadResult
from filedock.errors import ErrorCode, FiledockError
from filedock.record import field, record
from filedock.wire import format_crc

JobProgress = Callable[[str, str, int, int], None]
"""``progress(name, stage, done_bytes, total_bytes)`` for each file of a job."""

DECLARE_BATCH = 1000
"""Most files declared in one API request (the API's own limit)."""

@record
class LocalFile:
    """A file to upload: where it is here, what it is called in the job, how big it is, and its
    ``SourceStamp`` when found (the upload checks the file is still that version before committing)."""

    path: Path
    name: str
    size: int
    stamp: SourceStamp | None = field(default=None, compare=False)


@record
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


@record
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


_JOB_ID_SHAPE = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
"""A job id (a UUID); job names may not have this shape (``POST /v1/jobs``)."""


def find_or_create(job: str, create: bool) -> bool:
    """Whether ``job`` is resolved by one ``POST /v1/jobs`` with ``exist_ok`` (a name, to be created if
    missing) rather than a lookup that may answer 404 and then the creation: one round trip, not two."""
    return create and not _JOB_ID_SHAPE.fullmatch(job)


LOOKUP_INSTEAD = (ErrorCode.FORBIDDEN, ErrorCode.BAD_REQUEST)
"""Refusals of ``POST /v1/jobs`` with ``exist_ok`` after which the uploaders look the job up as before:
a token that may not create jobs (403), a server from before ``exist_ok`` (400)."""


def will_send(declared: dict[str, dict[str, Any]], local: list[LocalFile]) -> bool:
    """Whether some local file is not held complete by the job yet (so a session will be needed): the
    uploaders then open it beside the declaration of the files."""
    return any(declared.get(item.name, {}).get("state") != "complete" for item in local)


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


def planned_file(local: LocalFile, record: dict[str, Any], conflict: str | None = None) -> PlannedFile:
    return PlannedFile(local, record["key"], record["state"], record.get("received", 0),
                       record.get("crc32"), record.get("digest"), conflict)


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


@record
class Verify:
    """The server holds file ``index`` complete: hash the local file and compare (``compare_complete``),
    then feed the result to ``JobPlan.verified``."""

    index: int


@record
class Reported:
    """File ``index`` has its result already (a conflict): tell the caller's ``on_result``."""

    index: int


class JobPlan:
    """The run of one ``UploadPlan``, without I/O: the rules both job uploaders follow.

    * a file whose name the job has with another size is a ``conflict`` and is not sent;
    * a file the server holds complete is verified, not sent; one with other bytes is a
      ``conflict`` unless the plan ``replace``s, then it goes up as a new version;
    * small files go in batches within the server's limits (``batch_units``);
    * ``fail_fast``: the first file that is not complete ends the job (``upload_job``, as
      in the 2007 design: its Deferred fails); otherwise every file gets its result and the
      others carry on (``JobUploader``, the CLI).
    """

    def __init__(self, plan: UploadPlan, fail_fast: bool = False) -> None:
        self.plan = plan
        self.fail_fast = fail_fast
        self.results: dict[int, UploadResult] = {}
        self.todo: list[int] = []
        self.newer: list[int] = []  # complete on the server with other bytes: new versions to declare

    def start(self) -> list[Verify | Reported]:
        """What to do first, per file in order: verify those held complete; conflicts are reported.
        Raises the conflict's ``FiledockError`` at once if ``fail_fast``."""
        actions: list[Verify | Reported] = []
        for i, planned in enumerate(self.plan.files):
            if planned.conflict is not None:
                self._finish(i, UploadResult.failed(planned.local.name, planned.local.size, planned.key,
                                                    FiledockError(ErrorCode.CONFLICT, planned.conflict)))
                actions.append(Reported(i))
            elif planned.state == "complete":
                actions.append(Verify(i))
            else:
                self.todo.append(i)
        return actions

    def verified(self, index: int, result: UploadResult) -> bool:
        """The verdict on a file held complete -> True if it is to be reported now (False: it goes up
        as a new version, after ``declared_new_versions``). Raises if ``fail_fast`` and it failed."""
        if result.outcome is Outcome.CONFLICT and self.plan.replace:
            self.todo.append(index)
            self.newer.append(index)
            return False
        self._finish(index, result)
        return True

    def declared_new_versions(self, records: dict[str, dict[str, Any]]) -> None:
        """The new versions of ``newer`` are declared (``records`` by name): send those."""
        files = list(self.plan.files)
        for i in self.newer:
            files[i] = planned_file(files[i].local, records[files[i].local.name])
        self.plan = UploadPlan(self.plan.job, files, self.plan.replace)
        self.newer = []

    def units(self, limits: dict[str, Any], parallel: int = 1) -> list[list[int]]:
        """The files still to send as work units (indexes into the plan's files): a batch or one file."""
        self.todo.sort()
        units = batch_units([self.plan.files[i].local.size for i in self.todo], limits, parallel)
        return [[self.todo[j] for j in unit] for unit in units]

    def finished(self, index: int, result: UploadResult) -> None:
        """A sent file's result. Raises its error if ``fail_fast`` and it is not complete."""
        self._finish(index, result)

    def ordered(self) -> list[UploadResult]:
        """Every file's result, in the plan's order."""
        return [self.results[i] for i in range(len(self.plan.files))]

    def _finish(self, index: int, result: UploadResult) -> None:
        self.results[index] = result
        if self.fail_fast and not result.ok:
            message = result.message if result.message.startswith(f"{result.name}: ") else \
                f"{result.name}: {result.message}"
            raise FiledockError(result.code or ErrorCode.INTERNAL_ERROR, message)
