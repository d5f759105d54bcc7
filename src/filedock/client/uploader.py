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
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from filedock.client.blocking import DataPortClient, hash_stream_cancellable, hashed_ahead
from filedock.client.http import ApiClient
# the planning names are public here since before jobplan.py existed
from filedock.client.jobplan import (DECLARE_BATCH, JobPlan, JobProgress, LocalFile, PlannedFile,  # noqa: F401
                                     UploadPlan, Verify, batch_units, check_prefix, collect_files, compare_complete,
                                     find_or_create, LOOKUP_INSTEAD, planned_file, undeclared, will_send)
from filedock.client.model import Cancelled, UploadResult
from filedock.errors import ErrorCode, FiledockError, LocalFileError

log = logging.getLogger("filedock.client")

ResultCallback = Callable[[UploadResult], None]
"""Called once per file as soon as its result is known (from a worker thread when parallel)."""

_ANY_ADDRESS = ("", "0.0.0.0", "::")


def data_client_for(api: ApiClient, *, stall_timeout: float = 60.0, attempts: int = 5,
                    backoff: float = 0.5, congestion_control: str | None = None,
                    streams: int | str | None = None) -> DataPortClient:
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
        from filedock.client.trust import client_context

        context = api.ssl_context or client_context()
    return DataPortClient(host, int(port["port"]), ssl_context=context, stall_timeout=stall_timeout,
                          attempts=attempts, backoff=backoff, congestion_control=congestion_control,
                          streams=streams)


class JobUploader:
    """Uploads local files and directories into a job through the control API and the data port.

    ``data_client`` defaults to one ``make_data_client()`` builds when first needed (by default
    ``data_client_for(api)``, from ``GET /v1/info``).
    """

    def __init__(self, api: ApiClient, data_client: DataPortClient | None = None,
                 make_data_client: Callable[[], DataPortClient] | None = None) -> None:
        self.api = api
        self.data_client = data_client
        self.make_data_client = make_data_client or (lambda: data_client_for(api))
        self._early: _EarlySession | None = None  # opened by prepare beside the declarations, for run
        self._early_lock = threading.Lock()
        self._data_lock = threading.Lock()
        self._preconnecting: threading.Thread | None = None

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
        declared as a new version of that file.

        When something will be sent, the session and the first data connection are opened ahead,
        beside the declaring, for ``run`` to take (docs/client.md, "Round trips before the first
        byte"); a caller that prepares and does not run calls ``close``."""
        local = collect_files(paths, prefix)
        self.api.prefetch_info()  # run needs it; asked beside the job's requests, it costs no round trip
        record = self._resolve_job(job, create)
        conflicts: dict[str, str] = {}
        declared, missing = undeclared(record, local, conflicts)
        if will_send(declared, local):
            # something will be sent: its session opens beside the declaring, and its first data
            # connection as soon as GET /v1/info says where (round trips a long path would wait for)
            self._open_session_soon(record["id"])
            self._preconnecting = threading.Thread(target=self._preconnect, name="filedock-preconnect", daemon=True)
            self._preconnecting.start()
        try:
            self._declare(record["id"], missing, declared)
            if replace and conflicts:
                self._declare(record["id"], [f for f in local if f.name in conflicts], declared, replace=True)
                conflicts = {}
        except BaseException:
            self._drop_early_session()
            raise
        files = [planned_file(item, declared[item.name], conflicts.get(item.name)) for item in local]
        return UploadPlan(record, files, replace)

    def close(self) -> None:
        """Close what ``prepare`` opened ahead and no ``run`` took: its session, its data connection."""
        self._drop_early_session()
        if self._preconnecting is not None:
            self._preconnecting.join()  # until it has asked for the connection: closed below
        if self.data_client is not None:
            self.data_client.close_warm()

    def _preconnect(self) -> None:
        try:
            self._data_client().preconnect()
        except Exception as exc:  # noqa: BLE001 - run builds the data client again and reports it
            log.debug("preconnect: %s", exc)

    def _open_session_soon(self, job_id: str) -> None:
        """Open a session for ``job_id`` on a thread, for ``run`` to take (``_session_for``)."""
        early = _EarlySession(job_id, lambda: self.api.open_session(job_id))
        with self._early_lock:
            early, self._early = self._early, early
        if early is not None:
            self._close_early(early)

    def _session_for(self, job_id: str) -> dict[str, Any]:
        """The session ``prepare`` opened for this job if it is recent, else a new one."""
        with self._early_lock:
            early, self._early = self._early, None
        if early is not None:
            if early.job_id == job_id and early.fresh():
                return early.result()  # what open_session raised, if it failed
            self._close_early(early)
        return self.api.open_session(job_id)

    def _drop_early_session(self) -> None:
        with self._early_lock:
            early, self._early = self._early, None
        if early is not None:
            self._close_early(early)

    def _close_early(self, early: "_EarlySession") -> None:
        try:
            session = early.result()
        except FiledockError:
            return  # it was never opened
        self._close_session(session["key"])

    def _declare(self, job_id: str, files: list[LocalFile], declared: dict[str, dict[str, Any]],
                 replace: bool = False) -> None:
        for start in range(0, len(files), DECLARE_BATCH):
            batch = files[start:start + DECLARE_BATCH]
            records = self.api.add_files(job_id, [(f.name, f.size) for f in batch], replace=replace)
            declared.update((f["name"], f) for f in records)

    def _resolve_job(self, job: str, create: bool) -> dict[str, Any]:
        if find_or_create(job, create):  # a name: found or created in one request
            try:
                return self.api.find_or_create_job(job)
            except FiledockError as exc:
                if exc.code not in LOOKUP_INSTEAD:
                    raise
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
        try:
            return self._run_plan(plan, parallel, progress, cancel, on_result)
        finally:
            self._drop_early_session()  # one prepare opened that this run did not need

    def _run_plan(self, plan: UploadPlan, parallel: int, progress: JobProgress | None, cancel: threading.Event,
                  on_result: ResultCallback | None) -> list[UploadResult]:
        report: JobProgress = progress or (lambda name, stage, done, total: None)
        done: ResultCallback = on_result or (lambda result: None)
        job = JobPlan(plan)  # every file gets its result; the others carry on
        for action in job.start():
            if isinstance(action, Verify):
                if not job.verified(action.index, self._verify_complete(plan.files[action.index], report, cancel)):
                    continue  # same size, other bytes: a new version goes up below
            done(job.results[action.index])
        if job.newer:
            declared: dict[str, dict[str, Any]] = {}
            self._declare(plan.job_id, [plan.files[i].local for i in job.newer], declared, replace=True)
            job.declared_new_versions(declared)
        if job.todo:
            plan = job.plan
            data = self._data_client()
            data.preconnect()  # if prepare did not: the first file's connection opens while the session does
            limits = self._limits()
            try:
                session = self._session_for(plan.job_id)
            except BaseException:
                data.close_warm()
                raise
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

                units = job.units(limits, parallel)
                if parallel > 1:
                    parallel = min(parallel, len(units), self._connections_per_session(limits))
                if parallel <= 1:
                    got = {}
                    for unit in units:
                        got.update(run_unit(unit))
                else:
                    got = _run_threads(run_unit, units, parallel, cancel)
                for i, result in got.items():
                    job.finished(i, result)
            finally:
                data.close_warm()
                self._close_session(session["key"])
        return job.ordered()

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

    def _data_client(self) -> DataPortClient:
        """The data client given, or one for the address in ``GET /v1/info`` (made once)."""
        with self._data_lock:
            if self.data_client is None:
                self.data_client = self.make_data_client()
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
                ahead = hashed_ahead(f, local.size)
                if ahead is None:
                    hasher = hash_stream_cancellable(f, cancel)
                else:
                    try:
                        hasher = ahead.wait_cancellable(cancel)
                    finally:
                        ahead.stop()
        except OSError as exc:
            return UploadResult.failed(local.name, local.size, planned.key,
                                       LocalFileError(f"{local.path}: {exc.strerror or exc}"))
        return compare_complete(local, planned.key, planned.crc32, planned.digest, hasher, report)

    def _close_session(self, key: str) -> None:
        try:
            self.api.close_session(key)
        except FiledockError as exc:  # the uploads' outcome stands; an unclosed session just expires
            log.warning("could not close session: %s", exc)


EARLY_SESSION_SECONDS = 60.0
"""How old a session ``prepare`` opened may be for ``run`` to use it; an older one is closed and a new one
opened (a caller may run a plan long after preparing it, and sessions expire)."""


class _EarlySession:
    """``POST /v1/jobs/<job>/sessions`` running on a thread; ``result()`` is its answer or its error."""

    def __init__(self, job_id: str, open_session: Callable[[], dict[str, Any]]) -> None:
        self.job_id = job_id
        self._started = time.monotonic()
        self._future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        threading.Thread(target=self._run, args=(open_session,), name="filedock-api-session", daemon=True).start()

    def _run(self, open_session: Callable[[], dict[str, Any]]) -> None:
        try:
            self._future.set_result(open_session())
        except BaseException as exc:  # handed to result()
            self._future.set_exception(exc)

    def fresh(self) -> bool:
        return time.monotonic() - self._started < EARLY_SESSION_SECONDS

    def result(self) -> dict[str, Any]:
        return self._future.result()


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
