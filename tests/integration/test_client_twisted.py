"""The Twisted client (versioned dialect) against a real server process.

The reactor runs in a daemon thread for the whole session (the ``reactor_thread``
fixture of tests/conftest.py); each test calls into it with ``in_reactor`` and waits
for the Deferred with a timeout, so a hung transfer fails the test instead of
stalling the run.
"""

from __future__ import annotations

import os
import queue
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from filedock import digest
from filedock.client.model import DURABLE, SENT, VERIFIED, Cancelled
from filedock.client.txclient import TxApiClient, TxDataPortClient, upload_job
from filedock.errors import ErrorCode, FiledockError

SIZE = 3 * 1024 * 1024 + 12345


def in_reactor(reactor: Any, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
    """Call ``fn`` in the reactor thread and wait for its result (a Deferred's, if it returns one).

    Like ``blockingCallFromThread``, with a timeout. Failures are raised here.
    """
    answers: queue.Queue = queue.Queue()
    reactor.callFromThread(lambda: defer.maybeDeferred(fn, *args, **kwargs).addBoth(answers.put))
    result = answers.get(timeout=timeout)
    if isinstance(result, Failure):
        result.raiseException()
    return result


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll until ``predicate()`` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def data_client(reactor: Any, server: Any) -> TxDataPortClient:
    host, port = server.data_addr
    return TxDataPortClient(reactor, host, port)


def test_upload_then_download_is_byte_identical(server, reactor_thread, tmp_path):
    """An upload is STORED with the local CRC-32 and digest, progress runs SENT..., DURABLE,
    VERIFIED, and a download of the same file gives back the same bytes, renamed from .part."""
    src = random_file(tmp_path / "take1.wav", SIZE)
    _, files, session = server.job_with_files("tx", {"take1.wav": SIZE})
    key = files["take1.wav"]["key"]
    client = data_client(reactor_thread, server)
    stages: list[tuple[str, int, int]] = []

    result = in_reactor(reactor_thread, client.upload_file, session["key"], key, src,
                        lambda *p: stages.append(p))

    local = digest.hash_file(src)
    assert (result.state, result.size, result.resumed_from, result.sent) == ("complete", SIZE, 0, SIZE)
    assert result.digest == local.hexdigest()
    assert result.crc32 == zlib.crc32(src.read_bytes())
    assert [s for s, _, _ in stages[-2:]] == [DURABLE, VERIFIED]
    sent = [d for s, d, _ in stages if s == SENT]
    assert sent[0] == 0 and sent[-1] == SIZE and sent == sorted(sent) and len(sent) > 2
    record = server.api.file(key)
    assert (record["state"], record["digest"], record["crc32"]) == ("complete", local.hexdigest(),
                                                                    f"{result.crc32:08x}")

    dest = tmp_path / "copy.wav"
    down = in_reactor(reactor_thread, client.download_file, session["key"], key, str(dest))
    assert dest.read_bytes() == src.read_bytes()
    assert not Path(f"{dest}.part").exists()
    assert (down.size, down.sent, down.digest) == (SIZE, SIZE, local.hexdigest())


def test_download_resumes_from_part_file(server, reactor_thread, tmp_path):
    """A download with ``dest.part`` already holding a prefix asks only for the rest and
    still verifies the whole file."""
    src = random_file(tmp_path / "f.bin", SIZE)
    _, files, session = server.job_with_files("tx-part", {"f.bin": SIZE})
    key = files["f.bin"]["key"]
    client = data_client(reactor_thread, server)
    in_reactor(reactor_thread, client.upload_file, session["key"], key, src)
    dest = tmp_path / "out.bin"
    Path(f"{dest}.part").write_bytes(src.read_bytes()[:1_000_000])

    down = in_reactor(reactor_thread, client.download_file, session["key"], key, str(dest))

    assert (down.resumed_from, down.sent) == (1_000_000, SIZE - 1_000_000)
    assert dest.read_bytes() == src.read_bytes()
    assert down.digest == digest.hash_file(src).hexdigest()


def test_upload_job_from_async_def(server, reactor_thread, tmp_path):
    """From ``async def`` through ``defer.ensureDeferred``: TxApiClient creates the job,
    ``upload_job`` declares and uploads two files one after another (both end complete), and
    a second run verifies them without sending a byte."""
    paths = [random_file(tmp_path / "a.bin", 700_000), random_file(tmp_path / "b.bin", 1_300_000)]
    job_progress: list[tuple] = []

    async def upload():
        api = TxApiClient(reactor_thread, server.url, server.token)
        job = await api.create_job("async-job")
        results = await upload_job(api, job["name"], paths, lambda *p: job_progress.append(p))
        record = await api.job(job["id"])
        again = await upload_job(api, job["id"], paths)
        return results, record, again

    results, record, again = in_reactor(reactor_thread, lambda: defer.ensureDeferred(upload()))

    assert [r.name for r in results] == ["a.bin", "b.bin"]
    assert [r.digest for r in results] == [digest.hash_file(p).hexdigest() for p in paths]
    assert record["state"] == "complete" and record["files_complete"] == 2
    assert {f["name"]: f["state"] for f in record["files"]} == {"a.bin": "complete", "b.bin": "complete"}
    assert job_progress[-1] == ("b.bin", VERIFIED, 1_300_000, 1_300_000)
    first_b = next(i for i, p in enumerate(job_progress) if p[0] == "b.bin")
    assert all(p[0] == "a.bin" for p in job_progress[:first_b])  # one file after another
    assert [(r.state, r.sent, r.resumed_from, r.digest) for r in again] == \
        [("complete", 0, r.size, r.digest) for r in results]


def test_cancel_keeps_partial_and_next_upload_resumes(server, reactor_thread, tmp_path):
    """``d.cancel()`` mid-stream fails with Cancelled and closes cleanly; the server keeps a
    partial (state partial, received > 0); the next upload resumes from it and sends only the rest."""
    size = 8 * 1024 * 1024
    src = random_file(tmp_path / "big.bin", size)
    _, files, session = server.job_with_files("tx-cancel", {"big.bin": size})
    key = files["big.bin"]["key"]
    client = data_client(reactor_thread, server)
    pending: list[defer.Deferred] = []

    def cancel_after_a_mib(stage: str, done: int, total: int) -> None:
        if stage == SENT and done >= 1024 * 1024 and pending and not pending[0].called:
            pending[0].cancel()

    def start():
        d = client.upload_file(session["key"], key, src, cancel_after_a_mib)
        pending.append(d)
        return d

    with pytest.raises(Cancelled):
        in_reactor(reactor_thread, start)

    record = wait_for(lambda: (r := server.api.file(key))["state"] == "partial" and r)
    assert 0 < record["received"] < size

    result = in_reactor(reactor_thread, client.upload_file, session["key"], key, src)

    assert result.resumed_from == record["received"]
    assert result.sent == size - record["received"] < size
    assert result.digest == digest.hash_file(src).hexdigest()
    assert server.api.file(key)["state"] == "complete"


def test_resume_with_late_local_digest_reconnects(server, reactor_thread, tmp_path, monkeypatch):
    """When the local digest of a resumed prefix is not ready once the body is sent, the client
    closes (the server checkpoints), waits for the digest, reconnects with nothing left to send
    and still ends STORED and verified; ``sent`` counts each byte once."""
    from filedock.client.twisted import streaming, upload

    size = 6 * 1024 * 1024
    src = random_file(tmp_path / "late.bin", size)
    _, files, session = server.job_with_files("tx-late", {"late.bin": size})
    key = files["late.bin"]["key"]
    host, port = server.data_addr
    quick = TxDataPortClient(reactor_thread, host, port)
    pending: list[defer.Deferred] = []

    def start():
        def progress(stage, done, total):
            if done >= 2 * 1024 * 1024 and not pending[0].called:
                pending[0].cancel()
        pending.append(quick.upload_file(session["key"], key, src, progress))
        return pending[0]

    with pytest.raises(Cancelled):
        in_reactor(reactor_thread, start)
    held = wait_for(lambda: (r := server.api.file(key))["state"] == "partial" and r)["received"]
    hash_range = streaming.OrderedHasher._hash_range
    monkeypatch.setattr(streaming.OrderedHasher, "_hash_range",
                        lambda self, start, length: (time.sleep(0.5), hash_range(self, start, length)))
    offsets: list[int] = []
    patient = TxDataPortClient(reactor_thread, host, port, hash_wait=0.05)
    monkeypatch.setattr(upload.UploadExchange, "_send_from",
                        lambda self, offset, send=upload.UploadExchange._send_from:
                        (offsets.append(offset), send(self, offset)))

    result = in_reactor(reactor_thread, patient.upload_file, session["key"], key, src)

    assert offsets == [held, size]  # second connection: the server held everything
    assert (result.resumed_from, result.sent) == (held, size - held)
    assert result.digest == digest.hash_file(src).hexdigest()
    assert server.api.file(key)["state"] == "complete"


def test_abort_discards_partial(server, reactor_thread, tmp_path):
    """``abort_file`` after a cancelled upload makes the server drop the partial: received 0."""
    size = 8 * 1024 * 1024
    src = random_file(tmp_path / "x.bin", size)
    _, files, session = server.job_with_files("tx-abort", {"x.bin": size})
    key = files["x.bin"]["key"]
    client = data_client(reactor_thread, server)
    pending: list[defer.Deferred] = []

    def start():
        def progress(stage, done, total):
            if done >= 1024 * 1024 and not pending[0].called:
                pending[0].cancel()
        pending.append(client.upload_file(session["key"], key, src, progress))
        return pending[0]

    with pytest.raises(Cancelled):
        in_reactor(reactor_thread, start)
    wait_for(lambda: server.api.file(key)["state"] == "partial")

    assert in_reactor(reactor_thread, client.abort_file, session["key"], key) is None

    record = server.api.file(key)
    assert (record["state"], record["received"]) == ("pending", 0)


def test_server_error_line_becomes_filedock_error(server, reactor_thread, tmp_path):
    """An ``ERR`` reply fails the Deferred with FiledockError carrying the server's code."""
    src = random_file(tmp_path / "f", 1000)
    _, files, _ = server.job_with_files("tx-err", {"f": 1000})

    with pytest.raises(FiledockError) as caught:
        in_reactor(reactor_thread, data_client(reactor_thread, server).upload_file,
                   "00000000-0000-4000-8000-000000000000", files["f"]["key"], src)

    assert caught.value.code is ErrorCode.UNKNOWN_SESSION


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a self-signed certificate for ``localhost`` (PEM files)."""
    from tests.integration.harness import tls_files

    return tls_files(directory)


def test_upload_and_download_over_tls(reactor_thread, tmp_path):
    """With ``tls_options`` the client speaks TLS (wrapClientTLS) to a TLS data port, checks the
    server's certificate, and the same upload and download round trip holds."""
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    from tests.integration.harness import ServerProcess

    key_path, cert_path = self_signed(tmp_path)
    listen = f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
    with ServerProcess(tmp_path / "data", extra=["--data-listen", listen]) as server:
        assert server.api.info()["data_port"]["tls"] is True
        src = random_file(tmp_path / "t.bin", 1_500_000)
        _, files, session = server.job_with_files("tls", {"t.bin": 1_500_000})
        key = files["t.bin"]["key"]
        trust = Certificate.loadPEM(cert_path.read_bytes())
        host, port = server.data_addr
        client = TxDataPortClient(reactor_thread, host, port, optionsForClientTLS("localhost", trust))

        result = in_reactor(reactor_thread, client.upload_file, session["key"], key, src)
        dest = tmp_path / "t.out"
        in_reactor(reactor_thread, client.download_file, session["key"], key, str(dest))

    assert result.digest == digest.hash_file(src).hexdigest()
    assert dest.read_bytes() == src.read_bytes()


def test_server_killed_mid_upload_client_reconnects_on_its_own(reactor_thread, tmp_path):
    """SIGKILL and restart of the server (same ports) during an upload: the Twisted client reconnects
    after a backoff, resumes from the durable offset and ends verified, with no call from the caller."""
    import threading

    from tests.integration.harness import ServerProcess

    size = 24 * 1024 * 1024
    src = random_file(tmp_path / "crash.bin", size)
    server = ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M"]).start()
    try:
        _, files, session = server.job_with_files("tx-crash", {"crash.bin": size})
        key = files["crash.bin"]["key"]
        client = TxDataPortClient(reactor_thread, *server.data_addr, attempts=10, backoff=0.2)
        killed = threading.Event()

        def bounce() -> None:
            wait_for(lambda: server.api.file(key)["received"] > 0)
            server.kill()
            killed.set()
            server.start()

        def progress(stage: str, done: int, total: int) -> None:
            if stage == SENT and done >= 4 * 1024 * 1024 and not killed.is_set() and not bouncer.is_alive():
                bouncer.start()

        bouncer = threading.Thread(target=bounce)
        result = in_reactor(reactor_thread, client.upload_file, session["key"], key, src, progress, timeout=120)
        bouncer.join(30)
        assert killed.is_set()
        assert result.state == "complete" and result.digest == digest.hash_file(src).hexdigest()
        record = server.api.file(key)
        assert record["state"] == "complete" and record["digest"] == result.digest
    finally:
        server.stop()


def test_stalled_peer_is_abandoned_and_retried_then_given_up(reactor_thread, tmp_path):
    """A peer that answers OFFSET 0 and then reads nothing: after stall_timeout the connection is dropped
    and a new one tried; with no progress the client gives up after ``attempts`` with a clear error."""
    from tests.integration.test_client_blocking import StallingPeer

    peer = StallingPeer(receive_buffer=4096)
    src = random_file(tmp_path / "stall.bin", 16 * 1024 * 1024)
    client = TxDataPortClient(reactor_thread, "127.0.0.1", peer.port, attempts=2, backoff=0.05, stall_timeout=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(FiledockError) as info:
            in_reactor(reactor_thread, client.upload_file, "00000000-0000-4000-8000-000000000000",
                       "00000000-0000-4000-8000-000000000001", src, timeout=60)
    finally:
        peer.close()
    assert "gave up after 2 attempts" in info.value.message
    assert len(peer.connections) == 2
    assert 1.5 < time.monotonic() - started < 20


def test_upload_job_batches_small_files_declared_in_one_call(server, reactor_thread, tmp_path):
    """A tree of 40 small files and one big one: the small ones go in one BATCH, all 41 are declared in
    one API call, results come in the order of the files, each verified; the server's copies equal the
    local files; a second run verifies every file without sending a byte."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(40):
        random_file(tree / "sub" / f"s{i:02d}.bin", 1000 + i * 997)
    random_file(tree / "big.bin", 3 * 1024 * 1024)
    log_before = len(server.log())
    stages: list[tuple] = []

    async def upload():
        api = TxApiClient(reactor_thread, server.url, server.token)
        first = await upload_job(api, "tx-tree", [tree], lambda *p: stages.append(p), create=True)
        again = await upload_job(api, "tx-tree", [tree])
        return first, again, await api.job("tx-tree")

    first, again, record = in_reactor(reactor_thread, lambda: defer.ensureDeferred(upload()))
    names = ["big.bin"] + [f"sub/s{i:02d}.bin" for i in range(40)]
    assert [r.name for r in first] == names
    assert all(r.state == "complete" for r in first)
    assert [r.digest for r in first] == [digest.hash_file(tree / n).hexdigest() for n in names]
    assert record["state"] == "complete" and record["files_complete"] == 41
    for f in record["files"]:
        assert server.blob_path(record["id"], f["key"]).read_bytes() == (tree / f["name"]).read_bytes()
    log = server.log()[log_before:]
    assert "batch complete: 40 of 40 files stored" in log
    declarations = [line for line in log.splitlines() if '"POST /v1/jobs/' in line and '/files HTTP/1.1"' in line]
    assert len(declarations) == 1, declarations
    assert {s for n, s, _, _ in stages if n == "sub/s00.bin"} == {SENT, DURABLE, VERIFIED}
    assert [(r.state, r.sent, r.resumed_from) for r in again] == [("complete", 0, r.size) for r in first]


def test_upload_batch_answers_each_file(server, reactor_thread, tmp_path):
    """``upload_batch`` directly: a file whose size differs from its declaration is refused on its own
    (``size-mismatch``); the others are stored and verified."""
    paths = {n: random_file(tmp_path / n, size) for n, size in (("a", 5000), ("b", 7000), ("c", 9000))}
    _, files, session = server.job_with_files("tx-batch", {"a": 5000, "b": 6999, "c": 9000})
    client = data_client(reactor_thread, server)
    results = in_reactor(reactor_thread, client.upload_batch, session["key"],
                         [(files[n]["key"], paths[n], n) for n in ("a", "b", "c")])
    assert [(r.name, r.state) for r in results] == [("a", "complete"), ("b", "size-mismatch"), ("c", "complete")]
    assert results[0].digest == digest.hash_file(paths["a"]).hexdigest()
    assert {n: server.api.file(f["key"])["state"] for n, f in files.items()} == \
        {"a": "complete", "b": "pending", "c": "complete"}


def test_stalled_batch_is_sent_again_then_given_up(reactor_thread, tmp_path):
    """A peer that takes the BATCH line and then reads nothing: the stall watchdog drops the connection, a
    new one sends the batch again, and after ``attempts`` the client gives up with a clear error."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    files = [(f"00000000-0000-4000-8000-{i:012d}", random_file(tmp_path / f"f{i}", 400_000), f"f{i}")
             for i in range(40)]
    client = TxDataPortClient(reactor_thread, "127.0.0.1", listener.getsockname()[1], attempts=2, backoff=0.05,
                              stall_timeout=1.0)
    try:
        with pytest.raises(FiledockError) as info:
            in_reactor(reactor_thread, client.upload_batch, "00000000-0000-4000-8000-000000000000", files)
    finally:
        listener.close()
        for conn in held:
            conn.close()
    assert "gave up after 2 attempts" in info.value.message
    assert len(held) == 2


def test_cancelled_batch_closes_its_connection(reactor_thread, tmp_path):
    """Cancelling a batch while the peer is not reading (the producer paused): the Deferred fails with
    Cancelled saying nothing was stored, and once the peer reads again it gets EOF, not a connection
    held open forever."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict = {}
    go_on = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        go_on.wait(10)  # not reading until the client has cancelled
        conn.settimeout(5.0)
        try:
            while conn.recv(1 << 16):
                pass
            seen["eof"] = True
        except socket.timeout:
            seen["eof"] = False
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    files = [(f"00000000-0000-4000-8000-{i:012d}", random_file(tmp_path / f"f{i}", 1_000_000), f"f{i}")
             for i in range(40)]
    client = TxDataPortClient(reactor_thread, "127.0.0.1", listener.getsockname()[1])
    holder: dict = {}

    def start() -> None:
        holder["d"] = client.upload_batch("00000000-0000-4000-8000-000000000000", files)

    in_reactor(reactor_thread, start)
    time.sleep(0.7)  # the transport's buffer fills; the producer is paused
    with pytest.raises(Cancelled, match="nothing of this batch was stored"):
        in_reactor(reactor_thread, lambda: (holder["d"].cancel(), holder["d"])[1])
    go_on.set()
    wait_for(lambda: "eof" in seen, timeout=15)
    listener.close()
    assert seen["eof"] is True


def test_batch_on_a_slow_link_is_not_taken_for_a_stall(reactor_thread, tmp_path):
    """A peer reading steadily but slowly (about 250 KB/s) with a 2 s stall timeout: progress is counted in
    256 KiB pieces (about 1 s each here), not whole 900 KB files (3.6 s each), so the batch is never
    dropped as stalled (one connection)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    connections: list = []
    received = [0]

    def serve() -> None:
        conn, _ = listener.accept()
        connections.append(conn)
        while received[0] < 1_000_000:
            chunk = conn.recv(12_500)
            if not chunk:
                return
            received[0] += len(chunk)
            time.sleep(0.05)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    files = [(f"00000000-0000-4000-8000-{i:012d}", random_file(tmp_path / f"s{i}", 900_000), f"s{i}")
             for i in range(2)]
    client = TxDataPortClient(reactor_thread, "127.0.0.1", listener.getsockname()[1], attempts=1, backoff=0.05,
                              stall_timeout=2.0)
    with pytest.raises(FiledockError) as info:  # the fake peer closes without answering, in the end
        in_reactor(reactor_thread, client.upload_batch, "00000000-0000-4000-8000-000000000000", files, timeout=120)
    listener.close()
    assert received[0] >= 1_000_000, received[0]  # read it all on one connection, never aborted as stalled
    assert len(connections) == 1
    assert "nothing moved" not in info.value.message
