"""The clients' shared core without sockets (issue 11 items 3 and 4): events in, actions out.

``UploadAttempt``, ``DownloadAttempt`` (``filedock.client.transfer``), ``RetryPolicy`` /
``RetryBudget`` (``filedock.client.retry``), the typed errors and the result values.
"""

from __future__ import annotations

import pytest

from filedock import wire
from filedock.client.model import DownloadResult, Outcome, UploadResult
from filedock.client.retry import GiveUp, RetryBudget, RetryPolicy, Sleep
from filedock.client.transfer import (AwaitDigest, Connect, DownloadAttempt, DropPartial, Fail, Finish, QueryStored,
                                      Restart, SendBody, SendDone, UploadAttempt, reply_error)
from filedock.errors import (ErrorCode, FiledockError, LocalFileError, LocalProtocolError, RefusedByServer,
                             RemoteProtocolError, TransportFailure)

DIGEST = "ab" * 32
OTHER = "cd" * 32
FAST = RetryPolicy(attempts=3, backoff=0.01)


# ---------------------------------------------------------------- which failures are retried


@pytest.mark.parametrize("error, retried", [
    (TransportFailure("connection lost: reset"), True),
    (TransportFailure("cannot connect", ErrorCode.UNREACHABLE), True),
    (RefusedByServer(ErrorCode.TAKEN_OVER, "another connection took it"), True),
    (RefusedByServer(ErrorCode.IDLE_TIMEOUT, "quiet"), True),
    (RefusedByServer(ErrorCode.TOO_MANY_CONNECTIONS, "busy"), True),
    (RefusedByServer(ErrorCode.INTERNAL_ERROR, "the server failed inside"), True),
    (RefusedByServer(ErrorCode.UNKNOWN_SESSION, "no such session"), False),
    (RefusedByServer(ErrorCode.NO_SPACE, "full"), False),
    (LocalFileError("/x: Permission denied"), False),  # internal-error on the wire, never retried
    (RemoteProtocolError("unexpected reply 'HELLO'"), False),
    (LocalProtocolError("done() before the body"), False),
    (FiledockError(ErrorCode.CHANGED_DURING_UPLOAD, "grew"), False),
])
def test_retry_policy_is_the_one_place_that_decides(error, retried):
    """Transport failures and the four transient refusals are retried; a local file that cannot be
    read is not, although its code is ``internal-error`` like the server's retryable one."""
    assert RetryPolicy.retryable(error) is retried


def test_retry_budget_gives_up_after_attempts_in_a_row_and_progress_resets_it():
    """Failures in a row count up to ``attempts``; a failure after progress counts as the first."""
    budget = RetryBudget(FAST)
    drop = TransportFailure("connection lost")
    assert isinstance(budget.failed(drop), Sleep)
    assert isinstance(budget.failed(drop), Sleep)
    assert isinstance(budget.failed(drop, progressed=True), Sleep) and budget.failures == 1
    budget.failed(drop)
    given_up = budget.failed(drop)
    assert isinstance(given_up, GiveUp) and isinstance(given_up.error, TransportFailure)
    assert "gave up after 3 attempts in a row" in given_up.error.message
    final = RetryBudget(FAST).failed(RefusedByServer(ErrorCode.UNKNOWN_SESSION, "no"))
    assert isinstance(final, GiveUp) and final.error.message == "no"


def test_backoff_is_capped():
    """The delay doubles from ``backoff`` but never passes 30 s (with jitter: 1.5 x 30 at most)."""
    assert RetryPolicy(attempts=100, backoff=0.5).delay(60) <= 45.0
    assert 0.25 <= RetryPolicy(backoff=0.5).delay(1) <= 0.75


# ---------------------------------------------------------------- reply events as errors


def test_reply_errors_say_who_is_at_fault():
    """The server's ERR is a refusal; the wire's own verdict on a garbled reply blames the server
    (``bad-reply``), not the client's header; an early close is a transport failure."""
    refused = reply_error(wire.ServerError("unknown-session", "no such session"))
    assert isinstance(refused, RefusedByServer) and refused.code is ErrorCode.UNKNOWN_SESSION
    assert refused.message == "no such session"
    garbled = reply_error(wire.ServerError(ErrorCode.MALFORMED_HEADER.value, "unexpected reply 'HELLO'"))
    assert isinstance(garbled, RemoteProtocolError) and garbled.code is ErrorCode.BAD_REPLY
    too_long = reply_error(wire.ServerError(ErrorCode.MALFORMED_HEADER.value, "server reply line too long"))
    assert isinstance(too_long, RemoteProtocolError)
    assert isinstance(reply_error(wire.EndOfStream()), TransportFailure)
    assert isinstance(reply_error(wire.Aborted()), RemoteProtocolError)


def test_reply_error_from_a_real_garbled_line():
    """Fed through ``wire.ClientConnection``: a reply that is not OFFSET becomes a RemoteProtocolError."""
    conn = wire.ClientConnection()
    conn.send(wire.UploadRequest("00000000-0000-4000-8000-000000000000", "00000000-0000-4000-8000-000000000001", 10))
    conn.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    assert isinstance(reply_error(conn.next_event()), RemoteProtocolError)


# ---------------------------------------------------------------- an upload


def test_upload_resumes_from_the_offset_and_finishes_verified():
    """OFFSET 400 -> send 600 bytes from 400; DONE with the local digest; STORED equal -> complete."""
    attempt = UploadAttempt("a.bin", "key", 1000, FAST)
    assert attempt.start() == Connect()
    assert attempt.offset(400) == SendBody(400, 600)
    attempt.body_sent(600)
    assert attempt.digest_ready(7, DIGEST) == SendDone(DIGEST)
    action = attempt.stored(wire.Stored(1000, 7, DIGEST))
    assert isinstance(action, Finish)
    result = action.result
    assert isinstance(result, UploadResult) and result.outcome is Outcome.COMPLETE
    assert (result.resumed_from, result.sent, result.crc32, result.digest) == (400, 600, 7, DIGEST)


def test_upload_mismatch_fails_with_digest_mismatch():
    """STORED with other values than the local file's: never complete."""
    attempt = UploadAttempt("a.bin", "key", 10, FAST)
    attempt.start()
    attempt.offset(0)
    attempt.digest_ready(7, DIGEST)
    action = attempt.stored(wire.Stored(10, 7, OTHER))
    assert isinstance(action, Fail) and action.error.code is ErrorCode.DIGEST_MISMATCH
    assert action.error.message.startswith("a.bin: ")


def test_upload_drops_are_retried_until_the_budget_runs_out_unless_the_offset_grows():
    """Three drops at the same offset give up (naming the file); a higher offset on the next
    connection is progress and resets the count."""
    attempt = UploadAttempt("a.bin", "key", 1000, FAST)
    drop = TransportFailure("connection lost")
    attempt.start()
    attempt.offset(0)
    assert isinstance(attempt.failed(drop), Sleep)
    attempt.start()
    attempt.offset(500)  # progress
    assert isinstance(attempt.failed(drop), Sleep) and attempt.budget.failures == 1
    for _ in range(2):
        attempt.start()
        attempt.offset(500)
        action = attempt.failed(drop)
    assert isinstance(action, Fail) and "gave up after 3 attempts" in action.error.message
    assert action.error.message.startswith("a.bin: ")
    assert attempt.resumed_from == 0


def test_upload_final_failures_fail_at_once():
    """A refusal the policy does not retry, and a local file error, end the upload on the first failure."""
    for error in (RefusedByServer(ErrorCode.SESSION_CLOSED, "closed"), LocalFileError("a.bin: unreadable")):
        attempt = UploadAttempt("a.bin", "key", 10, FAST)
        attempt.start()
        action = attempt.failed(error)
        assert isinstance(action, Fail) and action.error.code == error.code


def test_upload_of_a_file_the_server_holds_complete_is_verified_not_sent():
    """already-complete -> QueryStored; its values before the local digest wait for it; equal -> complete
    with nothing sent and resumed_from the whole size."""
    attempt = UploadAttempt("a.bin", "key", 10, FAST)
    attempt.start()
    assert attempt.failed(RefusedByServer(ErrorCode.ALREADY_COMPLETE, "done")) == QueryStored(10)
    assert attempt.stored(wire.Stored(10, 7, DIGEST)) is None
    action = attempt.digest_ready(7, DIGEST)
    assert isinstance(action, Finish) and (action.result.resumed_from, action.result.sent) == (10, 0)


def test_upload_of_a_changed_file_drops_the_partial():
    """changed-during-upload before DONE: the partial is dropped, then the upload fails with that code."""
    attempt = UploadAttempt("a.bin", "key", 10, FAST)
    attempt.start()
    attempt.offset(0)
    action = attempt.failed(FiledockError(ErrorCode.CHANGED_DURING_UPLOAD, "the local file grew"))
    assert isinstance(action, DropPartial) and action.error.code is ErrorCode.CHANGED_DURING_UPLOAD
    assert action.error.message == "a.bin: the local file grew"


def test_upload_late_digest_reconnects_without_counting_a_failure():
    """A digest not ready when the body is out: close, wait, reconnect; no failure is counted."""
    attempt = UploadAttempt("a.bin", "key", 10, FAST)
    attempt.start()
    attempt.offset(0)
    assert attempt.digest_late() == AwaitDigest()
    assert attempt.start() == Connect() and attempt.budget.failures == 0
    assert attempt.offset(10) == SendBody(10, 0)
    assert attempt.resumed_from == 0


# ---------------------------------------------------------------- a download


def test_download_resumes_and_finishes_with_a_download_result():
    """A partial of 4 bytes: GET from 4; the rest received; equal values -> DownloadResult, complete."""
    attempt = DownloadAttempt("d.bin", "key", FAST)
    assert attempt.start(4) == Connect(4)
    assert attempt.started(wire.DownloadStart(10, 4, 7, DIGEST)) is None
    attempt.body_received(6)
    action = attempt.complete(7, DIGEST)
    assert isinstance(action, Finish)
    result = action.result
    assert isinstance(result, DownloadResult) and not isinstance(result, UploadResult)
    assert (result.outcome, result.resumed_from, result.received, result.crc32_hex) == \
        (Outcome.COMPLETE, 4, 6, "00000007")


def test_download_mismatch_discards_the_partial():
    """Bytes that hash to other values: fail with digest-mismatch and delete the partial."""
    attempt = DownloadAttempt("d.bin", "key", FAST)
    attempt.start(0)
    attempt.started(wire.DownloadStart(10, 0, 7, DIGEST))
    attempt.body_received(10)
    action = attempt.complete(8, DIGEST)
    assert isinstance(action, Fail) and action.discard and action.error.code is ErrorCode.DIGEST_MISMATCH


def test_download_drops_reconnect_from_what_the_partial_holds():
    """A drop after bytes arrived is retried from the partial's new length; without progress the
    budget runs out."""
    attempt = DownloadAttempt("d.bin", "key", FAST)
    attempt.start(0)
    attempt.started(wire.DownloadStart(10, 0, 7, DIGEST))
    attempt.body_received(3)
    assert isinstance(attempt.failed(TransportFailure("reset")), Sleep)
    assert attempt.connect() == Connect(3)
    assert isinstance(attempt.failed(TransportFailure("reset")), Sleep) and attempt.budget.failures == 2
    attempt.connect()
    action = attempt.failed(TransportFailure("reset"))
    assert isinstance(action, Fail) and "gave up after 3 attempts" in action.error.message


def test_download_starts_again_when_the_partial_is_not_a_prefix():
    """bad-offset with a non-empty partial, or another file on a later connection: Restart, then GET from 0."""
    attempt = DownloadAttempt("d.bin", "key", FAST)
    attempt.start(20)
    assert attempt.failed(RefusedByServer(ErrorCode.BAD_OFFSET, "past the end")) == Restart()
    assert attempt.restarted() == Connect(0)
    attempt.started(wire.DownloadStart(10, 0, 7, DIGEST))
    attempt.body_received(5)
    attempt.failed(TransportFailure("reset"))
    attempt.connect()
    assert attempt.started(wire.DownloadStart(12, 5, 9, OTHER)) == Restart()
    assert attempt.restarted() == Connect(0) and attempt.resumed_from == 0
    empty = DownloadAttempt("d.bin", "key", FAST)
    empty.start(0)
    assert isinstance(empty.failed(RefusedByServer(ErrorCode.BAD_OFFSET, "no")), Fail)


# ---------------------------------------------------------------- results


def test_result_outcome_and_the_cli_fields():
    """``outcome`` is an enum; ``state`` and ``to_json`` keep the CLI's values (complete, or the code);
    ``crc32`` is an int and ``crc32_hex`` the 8 hex digits the CLI prints."""
    done = UploadResult("a", 10, "k", 0, 10, 0xBEEF, DIGEST, Outcome.COMPLETE)
    assert (done.state, done.ok, done.crc32, done.crc32_hex) == ("complete", True, 0xBEEF, "0000beef")
    assert done.to_json() == {"name": "a", "size": 10, "key": "k", "resumed_from": 0, "sent": 10,
                              "crc32": "0000beef", "digest": DIGEST, "state": "complete", "message": ""}
    cases = [(FiledockError(ErrorCode.CONFLICT, "other bytes"), Outcome.CONFLICT, "conflict"),
             (FiledockError(ErrorCode.CHANGED_DURING_UPLOAD, "grew"), Outcome.CHANGED_DURING_UPLOAD,
              "changed-during-upload"),
             (RefusedByServer(ErrorCode.SIZE_MISMATCH, "no"), Outcome.FAILED, "size-mismatch"),
             (LocalFileError("x: gone"), Outcome.FAILED, "internal-error"),
             (RefusedByServer("some-newer-code", "?"), Outcome.FAILED, "some-newer-code")]
    for error, outcome, state in cases:
        failed = UploadResult.failed("a", 10, "k", error)
        assert (failed.outcome, failed.state, failed.ok, failed.to_json()["state"]) == (outcome, state, False, state)
    assert UploadResult("a", 1, "k").state == "pending"
    assert DownloadResult.failed("a", 1, "k", FiledockError(ErrorCode.NOT_COMPLETE, "later")).state == "not-complete"


# ---------------------------------------------------------------- a job plan


def _plan(states: list[str], replace: bool = False, conflict_at: int | None = None):
    from pathlib import Path

    from filedock.client.jobplan import LocalFile, PlannedFile, UploadPlan

    files = [PlannedFile(LocalFile(Path(f"/src/f{i}"), f"f{i}", 10 + i), f"key{i}", state,
                         conflict="f{i}: other size" if i == conflict_at else None)
             for i, state in enumerate(states)]
    return UploadPlan({"id": "job", "name": "j", "files": []}, files, replace)


def _result(name: str, outcome: Outcome, code: ErrorCode | None = None) -> UploadResult:
    return UploadResult(name, 10, "k", outcome=outcome, code=code, message="why")


def test_job_plan_verifies_complete_files_reports_conflicts_and_sends_the_rest():
    """A conflict is reported at once, a complete file is verified, the others are sent; every file
    gets its result and the others carry on after a failure (JobUploader's rule)."""
    from filedock.client.jobplan import JobPlan, Reported, Verify

    job = JobPlan(_plan(["pending", "complete", "partial", "pending"], conflict_at=0))
    assert job.start() == [Reported(0), Verify(1)]
    assert job.results[0].outcome is Outcome.CONFLICT and job.results[0].state == "conflict"
    assert job.verified(1, _result("f1", Outcome.COMPLETE)) is True
    assert job.units({}) == [[2], [3]]
    job.finished(2, _result("f2", Outcome.FAILED, ErrorCode.SIZE_MISMATCH))
    job.finished(3, _result("f3", Outcome.COMPLETE))
    assert [r.state for r in job.ordered()] == ["conflict", "complete", "size-mismatch", "complete"]


def test_job_plan_fail_fast_stops_at_the_first_failure():
    """``fail_fast`` (upload_job, as in 2007): the first file that is not complete raises its error,
    named."""
    from filedock.client.jobplan import JobPlan

    job = JobPlan(_plan(["pending", "pending"]), fail_fast=True)
    job.start()
    job.finished(0, _result("f0", Outcome.COMPLETE))
    with pytest.raises(FiledockError) as info:
        job.finished(1, _result("f1", Outcome.FAILED, ErrorCode.SIZE_MISMATCH))
    assert info.value.code is ErrorCode.SIZE_MISMATCH and info.value.message == "f1: why"
    with pytest.raises(FiledockError) as info:
        JobPlan(_plan(["pending"], conflict_at=0), fail_fast=True).start()
    assert info.value.code is ErrorCode.CONFLICT


def test_job_plan_replace_sends_a_complete_file_with_other_bytes_as_a_new_version():
    """With ``replace``, a verified conflict is not reported: it is declared anew and sent, in order."""
    from filedock.client.jobplan import JobPlan, Verify

    job = JobPlan(_plan(["complete", "pending"], replace=True))
    assert job.start() == [Verify(0)]
    conflict = _result("f0", Outcome.CONFLICT, ErrorCode.CONFLICT)
    assert job.verified(0, conflict) is False and job.newer == [0]
    job.declared_new_versions({"f0": {"key": "newkey", "state": "pending"}})
    assert job.plan.files[0].key == "newkey" and job.newer == []
    assert job.units({}) == [[0], [1]]


def test_job_plan_batches_small_files_within_the_servers_limits():
    """Files up to ``batch_item_max`` go together, at most ``batch_max_files`` a batch."""
    from filedock.client.jobplan import JobPlan

    job = JobPlan(_plan(["pending"] * 5))
    job.start()
    limits = {"batch_item_max": 12, "batch_max_files": 2, "batch_max_bytes": 1000}
    assert job.units(limits) == [[0, 1], [2], [3], [4]]  # f3 and f4 are 13 and 14 bytes: alone


# ---------------------------------------------------------------- a batch


def test_batch_leaves_out_a_changed_file_and_verifies_the_rest():
    """A file that is not its stamp when read leaves the batch (sent again without it); a stored file
    whose stamp changed afterwards is changed-during-upload too; the rest are verified."""
    from filedock.client.model import SourceStamp
    from filedock.client.transfer import BatchAttempt

    stamp = SourceStamp(10, 1, 1, 1)
    files = [("ka", "/a", "a"), ("kb", "/b", "b"), ("kc", "/c", "c")]
    attempt = BatchAttempt(files, {"ka": stamp, "kb": stamp, "kc": stamp}, FAST)
    assert attempt.start() == Connect()
    attempt.item_read("ka", 10, 7, DIGEST)
    assert attempt.source_changed("kb", "was modified") == Connect()
    assert [key for key, _, _ in attempt.remaining] == ["ka", "kc"]
    attempt.item_read("ka", 10, 7, DIGEST)
    attempt.item_read("kc", 10, 7, DIGEST)
    attempt.answered({"ka": wire.ItemStored("ka", 10, 7, DIGEST), "kc": wire.ItemStored("kc", 10, 7, DIGEST)})
    assert attempt.to_check() == [("ka", "/a"), ("kc", "/c")]
    seen: list[tuple] = []
    results = attempt.results({"ka": stamp, "kc": SourceStamp(11, 2, 1, 1)}, lambda *event: seen.append(event))
    assert [r.state for r in results] == ["complete", "changed-during-upload", "changed-during-upload"]
    assert "nothing was recorded complete" in results[1].message
    assert "stored it complete" in results[2].message
    assert ("a", "verified", 10, 10) in seen


def test_batch_retries_drops_then_gives_up_and_ends_when_every_file_changed():
    """Drops are retried within the budget; a batch whose every file changed has nothing left to send."""
    from filedock.client.model import SourceStamp
    from filedock.client.transfer import BatchAttempt

    attempt = BatchAttempt([("ka", "/a", "a")], {"ka": SourceStamp(1, 1, 1, 1)}, FAST)
    drop = TransportFailure("reset")
    assert isinstance(attempt.failed(drop), Sleep) and isinstance(attempt.failed(drop), Sleep)
    assert isinstance(attempt.failed(drop), Fail)
    assert isinstance(attempt.failed(RefusedByServer(ErrorCode.UNKNOWN_SESSION, "no")), Fail)
    assert attempt.source_changed("ka", "was deleted") is None
    assert [r.state for r in attempt.results({}, lambda *e: None)] == ["changed-during-upload"]
