"""GET: stream a complete file from an offset."""

from __future__ import annotations

from twisted.internet import defer, interfaces
from twisted.logger import Logger
from zope.interface import implementer

from filedock import wire
from filedock.errors import ErrorCode, FiledockError, short_key
from filedock.server.authority import DownloadSource
from filedock.server.dataport.channel import IRequestChannel, Request, RequestServices

log = Logger(namespace="filedock.dataport")


@implementer(interfaces.IPullProducer)
class FileProducer:
    """Streams a file from an offset in 1 MiB reads; the channel's transport pulls."""

    CHUNK = 1 << 20

    def __init__(self, channel: IRequestChannel, stats, f, remaining: int) -> None:
        self.channel, self.stats, self.f, self.remaining = channel, stats, f, remaining
        self.done = defer.Deferred()

    def resumeProducing(self) -> None:
        data = self.f.read(min(self.CHUNK, self.remaining)) if self.remaining else b""
        if not data:
            self.stopProducing()
            return
        self.remaining -= len(data)
        self.stats.bytes_sent += len(data)
        self.channel.touch()
        self.channel.write_body(data)

    def stopProducing(self) -> None:
        if not self.done.called:
            self.f.close()
            self.done.callback(self.remaining)


class Download(Request):
    """One download of a complete file, from the offset the client asked for."""

    def __init__(self, services: RequestServices, channel: IRequestChannel, request: wire.DownloadRequest) -> None:
        super().__init__(services, channel)
        self.request = request

    @defer.inlineCallbacks
    def start(self):
        s, req = self.services, self.request
        source: DownloadSource = yield s.authority.authorize_download(req.session_key, req.file_key)
        self.channel.authorized(source.job_id, req.session_key)
        if req.offset > source.size:
            raise FiledockError(ErrorCode.BAD_OFFSET, f"offset is past the end ({source.size} bytes)")
        fh = yield s.in_thread(s.blobs.open_complete, source.job_id, source.blob_name)
        if self.channel.ended():  # the job deleted (or the peer gone) while the file opened
            fh.close()
            return
        fh.seek(req.offset)
        s.stats.downloads += 1
        self.channel.accepted_download(source.size, source.crc32, source.digest)
        producer = FileProducer(self.channel, s.stats, fh, source.size - req.offset)
        self.channel.stream(producer)
        remaining = yield producer.done
        self.channel.finished()
        log.info("download of {key}: {result}", key=short_key(req.file_key),
                 result="complete" if remaining == 0 else f"stopped with {remaining} bytes left")
