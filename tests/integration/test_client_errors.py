"""Clients ride through server restarts and lost answers, and explain what they cannot ride through.

Real server processes on loopback, SIGKILLed and restarted; a small TCP proxy in
front of the control API that loses answers (the server acts, the client never hears)
to prove that repeating a request that changes state is safe; and the usual wrong
addresses (nothing there, the data port, https:// on a plain port, a certificate for
another name) with the message each one gets.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from twisted.internet import defer

from filedock.client.http import ApiClient
from filedock.client.model import RetryPolicy
from filedock.client.txclient import TxApiClient, upload_job
from filedock.errors import ErrorCode, FiledockError
from tests.integration.harness import ServerProcess
from tests.integration.test_client_twisted import in_reactor

MiB = 1 << 20


@pytest.fixture(autouse=True)
def no_user_config(tmp_path, monkeypatch):
    """The user's own config file is kept out of the way."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def filedock(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "filedock", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AnswerLosingProxy:
    """A TCP proxy to the control API that loses the answer to the first attempt of each request that
    matches ``lose`` (a request line prefix, e.g. ``b"POST "``): the request reaches the server and is
    acted on, the client's connection is then reset before any byte of the answer."""

    def __init__(self, upstream: tuple[str, int], lose: tuple[bytes, ...]) -> None:
        self.upstream, self.lose = upstream, lose
        self.seen: set[bytes] = set()
        self.lost: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as server:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            line = head.split(b"\r\n", 1)[0]
            request = b" ".join(line.split(b" ")[:2])
            # one request per connection, so every request passes here: the server closes after answering
            # (and says so), and the client does not keep the connection alive for its next request
            head = head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            with self._lock:
                losing = line.startswith(self.lose) and request not in self.seen
                self.seen.add(request)
            server.sendall(head)
            if losing:
                # the body (if any) follows the head; the server answers once it has it all
                server.settimeout(10)
                client.settimeout(0.2)
                answer = b""
                while not answer:
                    try:
                        more = client.recv(65536)
                        if more:
                            server.sendall(more)
                    except (TimeoutError, OSError):
                        pass
                    try:
                        server.settimeout(0.2)
                        answer = server.recv(65536)
                    except TimeoutError:
                        continue
                self.lost.append(request + b" -> " + answer.split(b"\r\n", 1)[0])
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return  # closing with linger 0 sends RST: the answer is lost
            self._pipe(client, server)

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        def one_way(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        t = threading.Thread(target=one_way, args=(b, a), daemon=True)
        t.start()
        one_way(a, b)
        t.join(30)

    def close(self) -> None:
        self.listener.close()


# ---------------------------------------------------------------- item 14: restarts and lost answers


def test_cli_upload_rides_through_repeated_sigkills_and_restarts(tmp_path):
    """Four files uploading at once (`--parallel 4`); the server is down when the CLI starts, then
    SIGKILLed and restarted three more times while bytes flow. The CLI finishes with exit 0 and every
    file is complete and byte-identical (before the fix: `error: internal-error: cannot reach ...`)."""
    sources = tmp_path / "in"
    sources.mkdir()
    for i in range(4):
        (sources / f"take{i}.bin").write_bytes(os.urandom(64 * MiB + i))  # long enough for four kills
    server = ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M"])
    server.start()
    try:
        server.kill()  # down when the CLI starts: its first API calls are refused
        cli = subprocess.Popen([sys.executable, "-m", "filedock", "upload", "--job", "bounce", "--create",
                                "--parallel", "4", "--json", str(sources)], env=server.env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        server.start()
        kills, parts = 1, server.data_dir / "jobs"

        def bytes_on_disk() -> int:
            total = 0
            for part in parts.rglob("*.part") if parts.exists() else []:
                try:  # a partial may be renamed into place between the listing and its stat
                    total += part.stat().st_size
                except FileNotFoundError:
                    pass
            return total

        deadline = time.monotonic() + 60
        while kills < 4 and cli.poll() is None and time.monotonic() < deadline:
            before = bytes_on_disk()
            while cli.poll() is None and bytes_on_disk() <= before + MiB // 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            if cli.poll() is not None:
                break
            server.kill()
            kills += 1
            time.sleep(0.3)
            server.start()
        stdout, stderr = cli.communicate(timeout=180)
        print(f"FIGURES kill_restart {{\"kills\": {kills}, \"exit\": {cli.returncode}}}")
        assert cli.returncode == 0, stderr
        assert kills >= 3, "the uploads ended before the server could be killed mid-stream"
        rows = {json.loads(line)["name"]: json.loads(line) for line in stdout.splitlines() if line.strip()}
        assert sorted(rows) == [f"take{i}.bin" for i in range(4)]
        assert all(row["state"] == "complete" for row in rows.values())
        job = server.api.job("bounce")
        assert [j["name"] for j in server.api.get("/v1/jobs")["jobs"]] == ["bounce"]
        assert {f["name"]: f["state"] for f in job["files"]} == {f"take{i}.bin": "complete" for i in range(4)}
        back = tmp_path / "back"
        down = filedock(server.env(), "download", "--job", "bounce", "--all", str(back))
        assert down.returncode == 0, down.stderr
        for i in range(4):
            assert (back / f"take{i}.bin").read_bytes() == (sources / f"take{i}.bin").read_bytes()
    finally:
        server.stop()


def test_lost_answers_to_state_changing_calls_are_safe_to_repeat(server, tmp_path):
    """The answers to the first POST of each kind (create the job, declare the files, open the
    session) are lost after the server acted. The CLI repeats them and still ends with exit 0, one
    job, each file declared once and complete."""
    proxy = AnswerLosingProxy(("127.0.0.1", int(server.url.rsplit(":", 1)[1].strip("/"))), (b"POST ",))
    try:
        (tmp_path / "a.txt").write_bytes(b"alpha" * 1000)
        (tmp_path / "b.bin").write_bytes(os.urandom(3 * MiB))
        env = {**server.env(), "FILEDOCK_URL": proxy.url}
        run = filedock(env, "upload", "--job", "lossy", "--create", "--json", str(tmp_path / "a.txt"),
                       str(tmp_path / "b.bin"))
        assert run.returncode == 0, run.stderr
        assert len(proxy.lost) >= 3, proxy.lost  # create, declare and open-session answers were lost
        jobs = server.api.get("/v1/jobs")["jobs"]
        assert [(j["name"], j["files_total"], j["files_complete"]) for j in jobs] == [("lossy", 2, 2)]
        made = filedock(env, "job", "create", "made-once", "--meta", "k=v", "--json")
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["metadata"] == {"k": "v"}
        assert [j["name"] for j in server.api.get("/v1/jobs")["jobs"]] == ["lossy", "made-once"]
    finally:
        proxy.close()


def test_a_real_conflict_is_still_a_conflict_after_a_lost_answer(server):
    """A repeated create whose job exists with OTHER metadata (someone else's) stays a `conflict`."""
    server.api.create_job("taken", {"owner": "ada"})
    proxy = AnswerLosingProxy(("127.0.0.1", int(server.url.rsplit(":", 1)[1].strip("/"))), (b"POST ",))
    try:
        api = ApiClient(proxy.url, server.token, retry=RetryPolicy(attempts=3, backoff=0.05))
        with pytest.raises(FiledockError) as info:
            api.create_job("taken", {"owner": "grace"})
        assert info.value.code is ErrorCode.CONFLICT
    finally:
        proxy.close()


def test_twisted_upload_job_repeats_lost_calls_and_rides_a_restart(server, reactor_thread, tmp_path):
    """The Twisted client through the same answer-losing proxy: `upload_job` with create=True
    finishes complete, the job holds each file once."""
    proxy = AnswerLosingProxy(("127.0.0.1", int(server.url.rsplit(":", 1)[1].strip("/"))), (b"POST ", b"GET "))
    try:
        paths = [tmp_path / "one.bin", tmp_path / "two.bin"]
        for p in paths:
            p.write_bytes(os.urandom(2 * MiB))

        async def upload():
            api = TxApiClient(reactor_thread, proxy.url, server.token, retry=RetryPolicy(backoff=0.1))
            return await upload_job(api, "tx-lossy", paths, create=True)

        results = in_reactor(reactor_thread, lambda: defer.ensureDeferred(upload()), timeout=120)
        assert [r.state for r in results] == ["complete", "complete"]
        assert len(proxy.lost) >= 4, proxy.lost
        job = server.api.job("tx-lossy")
        assert sorted((f["name"], f["state"]) for f in job["files"]) == [("one.bin", "complete"),
                                                                          ("two.bin", "complete")]
    finally:
        proxy.close()


# ---------------------------------------------------------------- issue 15 item 2: errors that say what to do


def test_nothing_listening_is_unreachable_and_says_what_to_check(tmp_path):
    """No server at FILEDOCK_URL: `error: unreachable: ...` naming the URL, where it came from and
    the question to ask; not `internal-error`, no traceback. The Twisted client says the same code."""
    url = f"http://127.0.0.1:{free_port()}/"
    env = {**os.environ, "FILEDOCK_URL": url, "FILEDOCK_TOKEN": "fdk_x"}
    run = filedock(env, "jobs")
    assert run.returncode == 1
    assert run.stderr.startswith("error: unreachable: "), run.stderr
    assert "is the server running?" in run.stderr.lower() and f"FILEDOCK_URL is {url}" in run.stderr
    assert "Traceback" not in run.stderr
    flag = filedock(env, "jobs", "--server", url)
    assert f"--server is {url}" in flag.stderr


def test_twisted_api_client_unreachable(reactor_thread):
    """TxApiClient against a closed port fails with `unreachable` after its attempts."""
    api = TxApiClient(reactor_thread, f"http://127.0.0.1:{free_port()}/", "t", retry=RetryPolicy(2, 0.05))
    with pytest.raises(FiledockError) as info:
        in_reactor(reactor_thread, api.info)
    assert info.value.code is ErrorCode.UNREACHABLE and "is the server running?" in info.value.message.lower()


def test_url_of_the_data_port_is_named_as_such(server):
    """FILEDOCK_URL pointing at the data port: the message says it is the data port and where the
    API's URL is found (before: `internal-error: cannot reach ...: ERR malformed-header ...`)."""
    host, port = server.data_addr
    env = {**server.env(), "FILEDOCK_URL": f"http://{host}:{port}/"}
    run = filedock(env, "jobs")
    assert run.returncode == 1
    assert run.stderr.startswith("error: unreachable: ") and "data port, not the control API" in run.stderr
    assert "malformed-header" not in run.stderr
    secure = filedock({**env, "FILEDOCK_URL": f"https://{host}:{port}/"}, "jobs")
    assert "data port, not the control API" in secure.stderr, secure.stderr


def test_https_on_a_plain_port_says_use_http(server):
    """https:// against the plain-HTTP API: `tls-failed` that says the port speaks plain HTTP and gives
    the http:// URL (before: `[SSL: UNEXPECTED_EOF_WHILE_READING]`)."""
    plain = server.url
    env = {**server.env(), "FILEDOCK_URL": plain.replace("http://", "https://")}
    run = filedock(env, "jobs")
    assert run.returncode == 1
    assert run.stderr.startswith("error: tls-failed: ") and "plain HTTP" in run.stderr
    assert plain.rstrip("/") in run.stderr and "SSL" not in run.stderr


def name_only_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed key and certificate for ``localhost`` only (no IP address in it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    assert ipaddress.ip_address("127.0.0.1")  # the address the server advertises, not in the certificate
    key_path, cert_path = directory / "name-key.pem", directory / "name-cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_certificate_for_a_name_while_the_server_advertises_an_ip(tmp_path):
    """A certificate for `localhost`, the data port advertised as 127.0.0.1: the upload fails with
    `tls-failed` saying to start the server with --public-host (before: file state `unauthorized`,
    `IP address mismatch`); the same server started with `--public-host localhost` takes the upload.
    https://127.0.0.1 for the API says to use a name the certificate names; no --cacert says --cacert."""
    key, cert = name_only_certificate(tmp_path)
    src = tmp_path / "take.bin"
    src.write_bytes(os.urandom(MiB))
    server = ServerProcess(tmp_path / "data", tls=(key, cert))
    server.start()
    try:
        api_port = server.url.rsplit(":", 1)[1].strip("/")
        env = {**server.env(), "FILEDOCK_URL": f"https://localhost:{api_port}/", "FILEDOCK_CACERT": str(cert)}
        run = filedock(env, "upload", "--job", "named", "--create", "--attempts", "2", str(src))
        assert run.returncode == 1
        assert "error: tls-failed: " in run.stderr and "--public-host" in run.stderr, run.stderr
        assert "unauthorized" not in run.stderr
        by_ip = filedock({**env, "FILEDOCK_URL": f"https://127.0.0.1:{api_port}/"}, "jobs")
        assert by_ip.stderr.startswith("error: tls-failed: ") and "name the certificate names" in by_ip.stderr
        untrusted = filedock({k: v for k, v in env.items() if k != "FILEDOCK_CACERT"}, "jobs")
        assert untrusted.stderr.startswith("error: tls-failed: ") and "--cacert" in untrusted.stderr
        server.stop()
        server.extra = ["--public-host", "localhost"]
        server.start()
        ok = filedock(env, "upload", "--job", "named", "--json", str(src))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["state"] == "complete"
    finally:
        server.stop()


def test_data_port_that_refuses_says_public_host(tmp_path):
    """A server that advertises a data-port address nothing listens on (here --public-host 127.0.0.2
    while it listens on 127.0.0.1): the upload ends `unreachable` with "--public-host" in the message,
    not `internal-error`."""
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    with ServerProcess(tmp_path / "data", extra=["--public-host", "127.0.0.2"]) as server:
        run = filedock(server.env(), "upload", "--job", "far", "--create", "--attempts", "2", str(src))
        assert run.returncode == 1
        assert "error: unreachable: " in run.stderr and "data port at 127.0.0.2" in run.stderr
        assert "--public-host" in run.stderr and "internal-error" not in run.stderr


# ---------------------------------------------------------------- the API connection kept alive


class CountingRelay(AnswerLosingProxy):
    """A TCP relay to the control API that loses nothing and counts the connections the client opens."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.accepted = 0
        super().__init__(upstream, ())

    def _serve(self, client: socket.socket) -> None:
        self.accepted += 1
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with client, server:
            self._pipe(client, server)


def test_the_api_client_keeps_its_connection_and_replaces_a_closed_one_at_once(tmp_path):
    """Requests one after another share one connection (one round trip each on a long path, not two);
    when the server restarts between two requests, the kept connection is found closed and the request
    goes again at once on a new one, without using up an attempt (the policy here allows one)."""
    server = ServerProcess(tmp_path / "data").start()
    relay = CountingRelay((server.api.host, server.api.port))
    try:
        api = ApiClient(relay.url, server.token, retry=RetryPolicy(attempts=1))
        job = api.create_job("kept")
        for i in range(5):
            api.add_file(job["id"], f"f{i}.wav", 100 + i)
        assert len(api.job(job["id"])["files"]) == 5
        assert relay.accepted == 1
        server.restart()
        assert [f["name"] for f in api.job(job["id"])["files"]] == [f"f{i}.wav" for i in range(5)]
        assert relay.accepted == 2
        api.close()
    finally:
        relay.close()
        server.stop()
