"""Mount filedock's data port in a Twisted application that keeps its own sessions.

In the 2007 design the sessions lived in a Perspective Broker server; here they
live in ``AppSessions``, a few dicts of the application's own. The data port asks
it (through ``ISessionAuthority``) whether a session may write a file, and tells it
what became durable. No filedock API, no SQL.

Run it::

    python examples/embed_dataport.py /tmp/embed-data

It prints a session key and a file key; upload with any 2007 client::

    (printf '%s %s %s\\r\\n' SESSION FILE 5; printf hello) | nc 127.0.0.1 PORT
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field

from twisted.internet import defer
from zope.interface import implementer

from filedock.errors import ErrorCode, FiledockError
from filedock.server.authority import DownloadSource, ISessionAuthority, UploadTarget


@dataclass
class AppFile:
    """The application's own record of an expected file."""

    job_id: str
    name: str
    size: int
    received: int = 0
    crc32: int = 0
    stamp: str | None = None
    digest: str | None = None
    complete: bool = False


@implementer(ISessionAuthority)
@dataclass
class AppSessions:
    """An application's in-memory sessions and files, as the data port sees them."""

    sessions: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (job, expires)
    files: dict[str, AppFile] = field(default_factory=dict)
    completed: list[str] = field(default_factory=list)

    def open_session(self, job_id: str, ttl: float = 3600.0) -> str:
        key = str(uuid.uuid4())
        self.sessions[key] = (job_id, time.time() + ttl)
        return key

    def expect_file(self, job_id: str, name: str, size: int) -> str:
        key = str(uuid.uuid4())
        self.files[key] = AppFile(job_id, name, size)
        return key

    def _file(self, session_key: str, file_key: str) -> AppFile:
        if session_key not in self.sessions:
            raise FiledockError(ErrorCode.UNKNOWN_SESSION, "no such session")
        job_id, expires = self.sessions[session_key]
        if expires <= time.time():
            raise FiledockError(ErrorCode.SESSION_EXPIRED, "the session has expired")
        f = self.files.get(file_key)
        if f is None or f.job_id != job_id:
            raise FiledockError(ErrorCode.UNKNOWN_FILE, "no such file in this session's job")
        return f

    # ISessionAuthority

    def authorize_upload(self, session_key, file_key, size):
        return defer.maybeDeferred(self._authorize_upload, session_key, file_key, size)

    def _authorize_upload(self, session_key, file_key, size):
        f = self._file(session_key, file_key)
        if size is not None and size != f.size:
            raise FiledockError(ErrorCode.SIZE_MISMATCH, f"expected {f.size} bytes")
        if f.complete:
            raise FiledockError(ErrorCode.ALREADY_COMPLETE, "already complete")
        return UploadTarget(f.job_id, file_key, f.size, f.received, f.crc32, f.stamp, f.name)

    def authorize_download(self, session_key, file_key):
        def check():
            f = self._file(session_key, file_key)
            if not f.complete:
                raise FiledockError(ErrorCode.NOT_COMPLETE, "not complete yet")
            return DownloadSource(f.job_id, file_key, f.size, f.crc32, f.digest, f.name)
        return defer.maybeDeferred(check)

    def record_progress(self, target, offset, crc32, stamp):
        f = self.files[target.file_key]
        f.received, f.crc32, f.stamp = offset, crc32, stamp
        return defer.succeed(None)

    def record_complete(self, target, crc32, digest):
        f = self.files[target.file_key]
        f.received, f.crc32, f.digest, f.complete = f.size, crc32, digest, True
        self.completed.append(target.file_key)
        return defer.succeed(False)

    def record_discard(self, target):
        f = self.files[target.file_key]
        f.received, f.crc32, f.stamp = 0, 0, None
        return defer.succeed(None)


def main(data_dir: str) -> None:
    from twisted.internet import endpoints, reactor

    from filedock.server.dataport import DataPortFactory
    from filedock.store.blobs import BlobStore

    app = AppSessions()
    job = str(uuid.uuid4())
    session = app.open_session(job)
    file_key = app.expect_file(job, "hello.txt", 5)
    blobs = BlobStore(data_dir)
    factory = DataPortFactory(app, blobs)

    def listening(port):
        print(f"data port 127.0.0.1:{port.getHost().port}\nsession {session}\nfile {file_key}", flush=True)

    endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1:backlog=1024").listen(factory).addCallback(listening)
    reactor.run()
    blobs.close()  # stops the work queue the store made for its writers


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "./embed-data")
