"""``upload_job``: a job's files from Twisted, planned like ``JobUploader`` (``filedock.client.jobplan``)."""

from __future__ import annotations

import os
from typing import Any, Sequence
from urllib.parse import urlsplit

from twisted.internet import defer, threads

from filedock import digest
from filedock.client.model import UploadResult
from filedock.client.twisted.api import TxApiClient
from filedock.client.twisted.dataport import TxDataPortClient
from filedock.client.jobplan import (DECLARE_BATCH, JobPlan, JobProgress, UploadPlan, Verify, collect_files,
                                     compare_complete, find_or_create, LOOKUP_INSTEAD, planned_file, undeclared,
                                     will_send)
from filedock.errors import ErrorCode, FiledockError

_ANY_ADDRESS = ("", "0.0.0.0", "::")


def upload_job(api: TxApiClient, job: str, paths: Sequence[str | os.PathLike], progress: JobProgress | None = None,
               *, create: bool = False, tls_options: Any = None, prefix: str = "",
               streams: int | str | None = None) -> defer.Deferred:
    """Upload files (directories expanded) into a job one after another -> ``list[UploadResult]``.

    Small files (up to the server's ``batch_item_max``) go together in ``BATCH``es,
    each file declared in one API call per thousand.

    Names and declarations follow the blocking ``JobUploader``: a file given
    directly is named by its base name, a file under a given directory by its
    relative path; a name the job lacks is declared with the file's size; a
    declared file of another size is a ``conflict``; a file the server holds
    complete is verified, not sent. ``job`` is an id or a name (created if
    ``create``). One session is opened and closed at the end. Unlike
    ``JobUploader``, the first failure fails the Deferred (as in the 2007 design:
    callback when all are in, errback otherwise); cancelling it cancels the file in
    flight. ``progress(name, stage, done, total)`` reports each file. The data
    port's address comes from ``GET /v1/info``; if it speaks TLS, ``tls_options``
    is used (default: ``optionsForClientTLS(host)`` with the platform's trust roots).
    ``prefix`` goes before every name (``filedock.client.jobplan.collect_files``). A
    file that changes while it is sent fails it with ``changed-during-upload``. ``streams`` (a number
    or ``"auto"``) sends each large file over several connections (``TxDataPortClient``).
    """
    return defer.ensureDeferred(_upload_job(api, job, paths, progress, create, tls_options, prefix, streams))


async def _upload_job(api: TxApiClient, job: str, paths: Sequence[str | os.PathLike],
                      progress: JobProgress | None, create: bool, tls_options: Any,
                      prefix: str = "", streams: int | str | None = None) -> list[UploadResult]:
    local = collect_files(paths, prefix)
    # asked beside what is waited for, as JobUploader does (docs/client.md, "Round trips before the first byte"):
    # GET /v1/info beside the job's request, the session beside the declaration of the files
    info_d = api.info()
    session_d: defer.Deferred | None = None
    try:
        record = await _resolve_job(api, job, create)
        declared, missing = undeclared(record, local)
        if will_send(declared, local):
            session_d = api.open_session(record["id"])
        for start in range(0, len(missing), DECLARE_BATCH):
            chunk = missing[start:start + DECLARE_BATCH]
            for entry in await api.add_files(record["id"], [(item.name, item.size) for item in chunk]):
                declared[entry["name"]] = entry
        info = await info_d
        client = _data_client(api, info, tls_options)
        client.streams = streams
        session = await (session_d if session_d is not None else api.open_session(record["id"]))
    except BaseException:
        info_d.addErrback(lambda _: None)  # nobody waits for it any more
        if session_d is not None:  # opened ahead for files that will not be sent now: closed before the failure
            try:
                opened = await session_d
                await api.close_session(opened["key"])
            except Exception:  # noqa: BLE001 - never opened (or awaited above): nothing to close
                pass
        raise
    plan = JobPlan(UploadPlan(record, [planned_file(item, declared[item.name]) for item in local]), fail_fast=True)
    report = progress or (lambda name, stage, done, total: None)
    try:
        for action in plan.start():  # as in 2007: the first failure fails the job's Deferred
            if isinstance(action, Verify):  # held complete: verified here, not sent again
                item = local[action.index]
                plan.verified(action.index, await _verify_complete(api.reactor, item, declared[item.name], report))
        limits = info.get("limits") if isinstance(info.get("limits"), dict) else {}
        for unit in plan.units(limits):
            items = [plan.plan.files[i] for i in unit]
            if len(items) > 1:
                done = await client.upload_batch(session["key"], [(p.key, p.local.path, p.local.name) for p in items],
                                                 report, {p.key: p.local.stamp for p in items
                                                          if p.local.stamp is not None})
                for i, result in zip(unit, done):
                    plan.finished(i, result)
                continue
            (planned,) = items

            def one_file(stage: str, done: int, total: int, name: str = planned.local.name) -> None:
                report(name, stage, done, total)
            plan.finished(unit[0], await client.upload_file(session["key"], planned.key, planned.local.path, one_file,
                                                            name=planned.local.name, expect=planned.local.stamp))
        return plan.ordered()
    finally:
        try:
            await api.close_session(session["key"])
        except FiledockError:
            pass  # the uploads' outcome stands; an unclosed session just expires


async def _verify_complete(reactor: Any, item: Any, record: dict[str, Any], report: JobProgress) -> UploadResult:
    """A file the server holds complete: hash the local one (in a thread) and compare, send nothing."""
    hasher = await threads.deferToThreadPool(reactor, reactor.getThreadPool(), digest.hash_file, item.path)
    return compare_complete(item, record["key"], record.get("crc32"), record.get("digest"), hasher, report)


def _data_client(api: TxApiClient, info: dict[str, Any], tls_options: Any) -> TxDataPortClient:
    """The data-port client for the address ``GET /v1/info`` gave (the API's host if unspecified)."""
    port = info["data_port"]
    host = port.get("host") or ""
    if host in _ANY_ADDRESS:
        host = urlsplit(api.base).hostname
    if port.get("tls") and tls_options is None:
        from twisted.internet.ssl import optionsForClientTLS

        tls_options = optionsForClientTLS(host)
    return TxDataPortClient(api.reactor, host, int(port["port"]), tls_options if port.get("tls") else None)


async def _resolve_job(api: TxApiClient, job: str, create: bool) -> dict[str, Any]:
    if find_or_create(job, create):  # a name: found or created in one request
        try:
            return await api.find_or_create_job(job)
        except FiledockError as exc:
            if exc.code not in LOOKUP_INSTEAD:
                raise
    try:
        return await api.job(job)
    except FiledockError as exc:
        if exc.code is not ErrorCode.NOT_FOUND or not create:
            raise
    created = await api.create_job(job)
    return {"files": [], **created}  # a job just made has no files (one a lost attempt made may list some)
