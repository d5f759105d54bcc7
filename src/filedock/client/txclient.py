"""The Twisted client: the data port in the versioned dialect, and the control API.

Every call returns a ``Deferred``, so it works from callbacks, from
``inlineCallbacks`` and from ``async def`` through ``defer.ensureDeferred``::

    async def send(reactor, api, job, paths):
        return await upload_job(api, job, paths)

    results = defer.ensureDeferred(send(reactor, TxApiClient(reactor, url, token), "takes", paths))

One data-port connection carries one request (PUT, GET, ABORT or BATCH). An upload asks
the server where to start (``OFFSET``), streams the rest of the file with a push
producer in 256 KiB reads (paused whenever the transport's buffer is full, so
memory stays bounded however large the file), sends ``DONE <digest>`` and waits
for ``STORED``. The local CRC-32 and content digest always cover the whole file:
bytes the server already held, and bytes that passed while a thread was busy, are
read back from disk in a thread; the rest is hashed as it is sent.

If the digest is still being computed when the last byte is out (a resume after a
long prefix), the connection is closed rather than left silent past the server's
idle timeout, and a new one sends ``DONE`` once the digest is ready.

Uploads reconnect on their own: after a dropped connection, a server restart, a
takeover or an idle timeout, and when nothing moved for ``stall_timeout`` seconds,
a new connection learns the server's durable offset and sends only the rest, after a
jittered exponential backoff. ``attempts`` counts failures in a row without
progress (a higher durable offset than any seen before resets it).

Cancelling a returned Deferred (``d.cancel()``) closes the connection cleanly and
fails it with ``Cancelled``; the server keeps the durable part of an upload, so the
next upload of the file resumes from there.

This module is the facade where these names have always been importable; the code
lives in ``filedock.client.twisted`` (``api``, ``dataport``, ``upload``,
``download``, ``batch``, ``job``, ``streaming``, ``exchange``), and the decisions
every client shares (retries, verification, a file that changed) in
``filedock.client.transfer`` and ``filedock.client.retry``.
"""

from __future__ import annotations

from filedock.client.twisted.api import MAX_API_REPLY, TxApiClient
from filedock.client.twisted.dataport import HASH_WAIT, TxDataPortClient
from filedock.client.twisted.job import upload_job
from filedock.client.twisted.streaming import CHUNK_SIZE, FileStreamer

__all__ = ["CHUNK_SIZE", "HASH_WAIT", "MAX_API_REPLY", "FileStreamer", "TxApiClient", "TxDataPortClient",
           "upload_job"]
