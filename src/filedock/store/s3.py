"""File bytes in a bucket of S3-compatible object storage, shared by several servers.

Layout under the URL's prefix (client-supplied names never become object names)::

    <prefix>jobs/<job-id>/<file-key>          complete file (appears only once verified)
    multipart upload of that same name        the partial's full parts
    <prefix>jobs/<job-id>/<file-key>.part     the tail past the last full part, at the last checkpoint
    <prefix>jobs/<job-id>/<file-key>.blocks   BLAKE3 hashes of the partial's whole 4 MiB blocks

A partial is a multipart upload. Its part size comes from the file's declared size
(``part_size_for``). Bytes past the last full part (the tail) are spooled to a
bounded local temporary file and sent as a part when it is full, on a few threads
at once. A checkpoint waits for the parts in flight, then writes the block list and
then the tail as objects; the tail object's metadata (offset, CRC-32, upload id,
parts) is the commit point, so a resume on any server continues from there without
re-hashing the prefix. ``finish`` compares the digest and only then completes the
multipart upload; an abort aborts it and deletes the tail and block list.
"""

from __future__ import annotations

import io
import os
import queue
import re
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable
from urllib.parse import parse_qs, urlsplit

from filedock.digest import BLOCK_HASH_SIZE, BLOCK_SIZE, ContentHasher
from filedock.errors import ErrorCode, FiledockError
from filedock.store.blobs import BatchEntry, BatchWriter, Checkpoint, FlowControl, PrefixLost, _check_key
from filedock.store.work_queue import Strand, WorkQueue

MiB = 1 << 20
S3_MIN_PART = 5 * MiB
"""S3 refuses a part under this (``EntityTooSmall``), except the last one."""
MIN_PART = 8 * MiB
MAX_PARTS = 10_000
MAX_PART = 5 << 30

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_RE = re.compile(r"[A-Za-z0-9._/-]{0,200}")


def part_size_for(declared_size: int) -> int:
    """The part size for a file of ``declared_size`` bytes: the smallest multiple of 4 MiB that
    is at least 8 MiB and fits the file in 10,000 parts (so 5 TiB gets 528 MiB parts).

    A multiple of the digest's block size, so every block boundary of the full parts
    is a part boundary and the tail holds the last unfinished block whole.
    """
    need = max(MIN_PART, -(-max(declared_size, 0) // MAX_PARTS))
    size = -(-need // BLOCK_SIZE) * BLOCK_SIZE
    if size > MAX_PART:
        raise FiledockError(ErrorCode.TOO_LARGE, f"{declared_size} bytes do not fit in {MAX_PARTS} S3 parts")
    return size


def _unavailable(what: str, exc: BaseException) -> FiledockError:
    return FiledockError(ErrorCode.BLOB_STORE_UNAVAILABLE, f"{what}: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response["Error"]
        return f"{err.get('Code', '?')}: {err.get('Message', '') or ''}".strip()
    return str(exc) or type(exc).__name__


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _not_found(exc: BaseException) -> bool:
    return _code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


@dataclass(frozen=True)
class TailState:
    """What a checkpoint's tail object says (its metadata): the commit point of a partial."""

    offset: int
    crc32: int
    upload_id: str
    parts: int
    part_size: int

    def metadata(self) -> dict[str, str]:
        return {"offset": str(self.offset), "crc32": str(self.crc32), "upload": self.upload_id,
                "parts": str(self.parts), "part-size": str(self.part_size)}

    @classmethod
    def of(cls, meta: dict[str, str]) -> "TailState":
        try:
            return cls(int(meta["offset"]), int(meta["crc32"]), meta.get("upload", ""), int(meta["parts"]),
                       int(meta["part-size"]))
        except (KeyError, ValueError) as exc:
            raise PrefixLost(f"the tail object's metadata is not ours ({exc})") from None


@dataclass
class StoredObject:
    """One thing in the bucket, for ``fsck``."""

    job_id: str
    name: str
    kind: str  # "complete", "tail", "blocks", "upload", "other"
    size: int
    where: str
    upload_id: str = ""


class S3PartialWriter(FlowControl):
    """Appends to one partial kept as a multipart upload; made by ``S3BlobStore.open_partial``.

    The caller (the reactor) only queues bytes; the store's work queue spools them to
    the tail file and hashes them, on this writer's strand; a full tail is handed to
    the store's part threads (``PARTS_IN_FLIGHT`` at most per writer, so the spool
    on disk is bounded too). ``write`` returns True when the caller is behind (see
    ``FlowControl``). ``checkpoint``, ``seal``, ``finish`` and ``close`` block: call
    them off the reactor.
    """

    HIGH_WATER = 32 << 20
    LOW_WATER = 8 << 20
    SERVICE_BYTES = 4 << 20
    PARTS_IN_FLIGHT = 4

    def __init__(self, store: "S3BlobStore", name: str, part_size: int, hasher: ContentHasher,
                 upload_id: str = "", parts: list[dict] | None = None, blocks: bytes = b"",
                 tail: BinaryIO | None = None, reset: bool = False, complete: bool = False) -> None:
        super().__init__()
        self.store, self.name, self.part_size = store, name, part_size
        self.hasher = hasher
        self.accepted = hasher.offset
        self.upload_id = upload_id
        self.parts: list[dict] = list(parts or [])  # {"PartNumber", "ETag"} of the full parts, in order
        self._blocks = bytearray(blocks)  # every finished block's hash: the block list object
        self._tail = tail if tail is not None else store.spool()
        self._tail.seek(0, os.SEEK_END)
        self._tail_len = self._tail.tell()
        self._in_flight: dict[int, Future] = {}
        self._slots = threading.Semaphore(self.PARTS_IN_FLIGHT)
        self._error: BaseException | None = None
        self._complete = complete  # the object is in place already (completed, never recorded)
        self.closed = False
        self.published = False
        self.needs_record = False
        self.on_drain = None
        self._strand: Strand = store.work_queue.strand(self._run, self.SERVICE_BYTES)
        self._stale_cleared = reset
        if reset:  # a new partial: whatever an older upload of this name left goes first, off the caller
            self._strand.put(_RESET, 0)

    @property
    def offset(self) -> int:
        """Bytes accepted so far (spooled, or queued to be)."""
        return self.accepted

    def write(self, data: bytes | memoryview) -> bool:
        """Append bytes; True means "pause until on_drain"."""
        self._raise_error()
        if self._complete:
            raise FiledockError(ErrorCode.EXCESS_DATA, "the file is complete already")
        self.accepted += len(data)
        with self._lock:
            self._queue_bytes(len(data))
        self._strand.put(data, len(data))
        return self._behind()

    def _run(self, item: Any) -> None:
        """On the writer's strand: reset, or spool and hash queued bytes (a full tail becomes a part)."""
        if item is _RESET:
            try:
                self.store._remove_partial(self.name)
            except BaseException as exc:  # surfaced by the next write or checkpoint
                self._error = self._error or exc
            return
        try:
            if self._error is None:
                self._spool(memoryview(item))
        except BaseException as exc:
            self._error = self._error or exc
        finally:
            self._written(len(item))

    def _spool(self, view: memoryview) -> None:
        while len(view):
            room = self.part_size - self._tail_len
            piece = view[:room]
            self._tail.write(piece)
            self.hasher.update(piece)
            self._tail_len += len(piece)
            view = view[len(piece):]
            if self._tail_len == self.part_size:
                self._send_full_tail()
        self._blocks += self.hasher.take_finished_blocks()

    def _send_full_tail(self) -> None:
        """Hand the full tail to a part thread as the next part; a new tail file starts."""
        if not self.upload_id:
            self._clear_stale_uploads()
            self.upload_id = self.store._create_upload(self.name)
        number = len(self.parts) + len(self._in_flight) + 1
        body, self._tail, self._tail_len = self._tail, self.store.spool(), 0
        self._slots.acquire()  # at most PARTS_IN_FLIGHT part files on disk per writer
        self._reap()
        self._in_flight[number] = self.store.parts_pool.submit(self._upload_part, number, body)

    def _clear_stale_uploads(self) -> None:
        """Before this partial's first multipart upload (or its one PutObject): abort the uploads of its
        name that no checkpoint of it names (parts a dead server sent after its last checkpoint)."""
        if not self._stale_cleared:
            for upload in self.store.uploads(self.name):
                if upload["Key"] == self.name:
                    self.store.abort_upload(self.name, upload["UploadId"])
            self._stale_cleared = True

    def _upload_part(self, number: int, body: BinaryIO) -> dict:
        try:
            body.seek(0)
            etag = self.store._upload_part(self.name, self.upload_id, number, body, self.part_size)
            return {"PartNumber": number, "ETag": etag}
        finally:
            body.close()
            self._slots.release()

    def _reap(self, wait: bool = False) -> None:
        """Move finished parts (in order) to ``parts``; with ``wait``, wait for all in flight first."""
        while self._in_flight:
            number = len(self.parts) + 1
            future = self._in_flight.get(number)
            if future is None or (not wait and not future.done()):
                return
            del self._in_flight[number]
            try:
                self.parts.append(future.result())
            except BaseException as exc:
                self._error = self._error or exc
                for other in self._in_flight.values():  # none may still read a spool file we close
                    other.exception()
                self._in_flight.clear()
                return

    def _raise_error(self) -> None:
        if self._error is not None:
            exc = self._error
            if isinstance(exc, FiledockError):
                raise exc
            raise _unavailable("the object store failed a write; the partial is kept at its last checkpoint", exc)

    def _on_strand(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in order with the queued bytes (on the strand); its error is raised here."""
        def capture():
            try:
                return fn(), None
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                return None, exc
        value, exc = self._strand.wait(capture)
        if exc is not None:
            raise exc
        return value

    def snapshot(self, strict: bool = True) -> tuple[int, int]:
        """Wait until everything accepted is spooled and hashed; returns (offset, crc32) then."""
        result = self._on_strand(lambda: (self.hasher.offset, self.hasher.crc32))
        if strict:
            self._raise_error()
        return result

    def checkpoint(self) -> Checkpoint:
        """Make everything written durable in the bucket; returns what may be recorded.

        Costs one PutObject of the block list (32 bytes per 4 MiB written) and one of
        the tail (less than one part), after the parts in flight are done.
        """
        if self._complete:
            return Checkpoint(self.hasher.offset, self.hasher.crc32, "s3:complete")
        return self._on_strand(self._checkpoint)

    def _checkpoint(self) -> Checkpoint:
        try:
            return self._put_checkpoint()
        except FiledockError:
            raise
        except Exception as exc:  # noqa: BLE001 - one clear line, the last checkpoint still holds
            raise _unavailable("the object store refused a checkpoint", exc) from None

    def _put_checkpoint(self) -> Checkpoint:
        self._reap(wait=True)
        self._raise_error()
        state = TailState(self.hasher.offset, self.hasher.crc32, self.upload_id, len(self.parts), self.part_size)
        self.store._put(self.name + ".blocks", bytes(self._blocks))
        self._tail.flush()
        self._tail.seek(0)
        self.store._put(self.name + ".part", self._tail, self._tail_len, state.metadata())
        self._tail.seek(0, os.SEEK_END)
        return Checkpoint(state.offset, state.crc32, f"s3:{self.upload_id}:{state.parts}")

    def seal(self) -> tuple[int, str]:
        """Wait for every part; returns (crc32, digest). The tail stays local until ``publish``."""
        self.snapshot()
        if not self._complete:
            self._on_strand(lambda: self._reap(wait=True))
            self._raise_error()
        return self.hasher.crc32, self.hasher.hexdigest()

    def publish(self) -> None:
        """Make the object: complete the multipart upload (the tail its last part), or one PutObject.

        Then the tail and block list objects go. Call after the digest was compared.
        """
        if not self._complete:
            try:
                self._on_strand(self._publish)
            except Exception as exc:  # noqa: BLE001
                # aborted under us: the file (or its job) was deleted. S3 says NoSuchUpload; Ceph's
                # gateway says 500 InternalError, so any other failure asks whether the upload still exists
                if _code(exc) == "NoSuchUpload" or (self.upload_id and self._upload_gone()):
                    raise FileNotFoundError(self.name) from None
                raise _unavailable("the object store could not complete the upload; the partial is kept",
                                   exc) from None
        else:
            # an object completed but never recorded (its server died between completing the upload
            # and deleting the tail): the tail and block list it left are obsolete now
            try:
                self._on_strand(lambda: self.store._delete_objects([self.name + ".part", self.name + ".blocks"]))
            except Exception:  # noqa: BLE001 (what is left is reported by fsck, and --repair removes it)
                pass
        self.published = True
        self.close()

    def _upload_gone(self) -> bool:
        """True if our multipart upload no longer exists (ListParts: not found); False if it does or we cannot tell."""
        try:
            self.store.client.list_parts(Bucket=self.store.bucket, Key=self.name, UploadId=self.upload_id,
                                         MaxParts=1)
        except Exception as exc:  # noqa: BLE001
            return _not_found(exc)
        return False

    def _publish(self) -> None:
        self._tail.flush()
        self._tail.seek(0)
        if not self.upload_id:  # smaller than one part: one request, no multipart upload
            self._clear_stale_uploads()
            self.store._put(self.name, self._tail, self._tail_len)
        else:
            parts = list(self.parts)
            if self._tail_len or not parts:
                number = len(parts) + 1
                parts.append({"PartNumber": number,
                              "ETag": self.store._upload_part(self.name, self.upload_id, number, self._tail,
                                                              self._tail_len)})
            self.store._complete_upload(self.name, self.upload_id, parts)
        self.store._delete_objects([self.name + ".part", self.name + ".blocks"])

    def finish(self, expected_digest: str | None = None) -> tuple[int, str]:
        """Seal, compare with ``expected_digest``, publish. On a mismatch nothing is published."""
        crc, digest = self.seal()
        if expected_digest is not None and expected_digest != digest:
            if self._complete:  # an object never recorded, with other bytes than the client's: not ours to keep
                self.store._delete_objects([self.name])
            self.close()
            raise FiledockError(ErrorCode.DIGEST_MISMATCH,
                                f"the server computed {digest}; the partial was deleted, upload again")
        self.publish()
        return crc, digest

    def close(self) -> None:
        """Wait for this writer's work, drop the local spool; the partial stays as last checkpointed."""
        if not self.closed:
            self.closed = True
            try:
                self._on_strand(lambda: self._reap(wait=True))
            except BaseException:  # noqa: BLE001 - a failed part only loses what the checkpoint did not hold
                pass
            self._tail.close()


_RESET = object()


class S3BatchWriter(BatchWriter):
    """The files of one ``BATCH``, spooled to local staging files and each sent as one PutObject on publish."""

    def __init__(self, store: "S3BlobStore", job_id: str) -> None:
        # the base class's target directory is never used: ``publish`` sends to the bucket instead
        super().__init__(store.staging_root / "unused", store.staging, None, store.work_queue)
        self._store, self._job_id = store, job_id

    def publish(self, accepted: list[BatchEntry]) -> None:
        """PutObject each accepted file (several at once); older partials of them go."""
        def put(entry: BatchEntry) -> str:
            name = self._store._name(self._job_id, entry.blob or entry.key)
            with open(entry.temp, "rb") as f:
                self._store._put(name, f, entry.size)
            entry.published = True
            return name

        try:
            names = list(self._store.parts_pool.map(put, accepted))
            # a batch file is smaller than a part, so an older partial of it left at most a tail and a block list
            self._store._delete_objects([n + ext for n in names for ext in (".part", ".blocks")])
        finally:
            self.discard()

    def discard(self) -> None:
        super().discard()
        for entry in self.entries:  # published ones too: their bytes are in the bucket now
            entry.temp.unlink(missing_ok=True)


class S3ReadStream(io.RawIOBase):
    """A complete object as a readable, seekable stream: one ranged GetObject from the position,
    read ahead by a thread in ``CHUNK`` pieces, at most ``AHEAD`` pieces held in memory."""

    CHUNK = 1 << 20
    AHEAD = 4

    def __init__(self, store: "S3BlobStore", name: str, size: int) -> None:
        super().__init__()
        self.store, self.name, self.size = store, name, size
        self._pos = 0
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._pending = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        target = max(0, base + offset)
        if target != self._pos:
            self._halt()
            self._pos = target
        return self._pos

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(self.AHEAD)
        threading.Thread(target=self._fetch, args=(self._pos, self._queue, self._stop), daemon=True,
                         name="filedock-s3-read").start()

    def _fetch(self, start: int, out: queue.Queue, stop: threading.Event) -> None:
        body = None
        try:
            body = self.store._get_body(self.name, start)
            while not stop.is_set():
                chunk = body.read(self.CHUNK)
                out.put(chunk)  # blocks while AHEAD chunks wait: memory stays bounded
                if not chunk:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            out.put(exc)
        finally:
            if body is not None:
                body.close()

    def _halt(self) -> None:
        if self._queue is not None:
            self._stop.set()
            try:
                while True:
                    self._queue.get_nowait()  # let the fetcher see the stop
            except queue.Empty:
                pass
            self._queue = None
        self._pending = b""

    def read(self, n: int = -1) -> bytes:
        if self._pos >= self.size:
            return b""
        if n is None or n < 0:
            n = self.size - self._pos
        if not self._pending:
            if self._queue is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._queue = None
                raise OSError(f"reading from the object store: {_describe(item)}")
            self._pending = item
            if not item:
                return b""
        out, self._pending = self._pending[:n], self._pending[n:]
        self._pos += len(out)
        return out

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._halt()
        super().close()


class S3BlobStore:
    """File bytes in a bucket. Methods block on the network: call them off the reactor."""

    STAGING_LANES = 4
    remote = True

    def __init__(self, client: Any, bucket: str, prefix: str = "", work_queue: WorkQueue | None = None,
                 url: str | None = None, spool_dir: str | Path | None = None, part_threads: int = 8) -> None:
        """A store over ``bucket`` (objects under ``prefix``) through the boto3 ``client``.

        Parts of partials and batch files are sent on ``part_threads`` threads; the tail
        of each partial is spooled in ``spool_dir`` (default: the system's temporary dir).
        """
        self.client, self.bucket = client, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = url or f"s3://{bucket}/{self.prefix}"
        self.work_queue = work_queue if work_queue is not None else WorkQueue()
        self._owns_queue = work_queue is None
        self._tmp = tempfile.TemporaryDirectory(prefix="filedock-s3-", dir=spool_dir)
        self.staging_root = Path(self._tmp.name)
        self.staging = [self.staging_root / "staging" / str(n) for n in range(self.STAGING_LANES)]
        for lane in self.staging:
            lane.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.parts_pool = ThreadPoolExecutor(part_threads, thread_name_prefix="filedock-s3-part")

    # -- making one

    @classmethod
    def from_url(cls, url: str, work_queue: WorkQueue | None = None, check: bool = True) -> "S3BlobStore":
        """``s3://bucket/prefix?endpoint=URL&region=R&profile=P``; credentials by boto3's chain.

        Raises ``FiledockError(bad-blobs-url)`` for a URL it cannot use and
        ``FiledockError(blob-store-unavailable)`` if ``check`` and the bucket cannot be reached.
        """
        client, bucket, prefix = s3_client_for(url)
        if check:
            try:
                client.head_bucket(Bucket=bucket)
            except Exception as exc:  # noqa: BLE001 - any failure to reach it is the same answer
                raise _unavailable(f"--blobs: cannot reach bucket {bucket!r}", exc) from None
        return cls(client, bucket, prefix, work_queue, url=_safe_url(url))

    def close(self) -> None:
        """Stop the threads this store made; remove its local spool."""
        self.parts_pool.shutdown(wait=True)
        if self._owns_queue:
            self.work_queue.stop()
        self._tmp.cleanup()

    def spool(self) -> BinaryIO:
        """A new local temporary file for a tail (gone when closed)."""
        return tempfile.TemporaryFile(dir=self.staging_root)

    def _name(self, job_id: str, key: str) -> str:
        return f"{self.prefix}jobs/{_check_key(job_id)}/{_check_key(key)}"

    # -- S3 requests (each one place, so errors say the same thing)

    def _put(self, name: str, body: BinaryIO | bytes, length: int | None = None,
             metadata: dict[str, str] | None = None) -> str:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": name, "Body": body}
        if length is not None:
            kwargs["ContentLength"] = length
        if metadata:
            kwargs["Metadata"] = metadata
        return self.client.put_object(**kwargs)["ETag"]

    def _create_upload(self, name: str) -> str:
        return self.client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"]

    def _upload_part(self, name: str, upload_id: str, number: int, body: BinaryIO, length: int) -> str:
        return self.client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number,
                                       Body=body, ContentLength=length)["ETag"]

    def _complete_upload(self, name: str, upload_id: str, parts: list[dict]) -> None:
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id,
                                              MultipartUpload={"Parts": parts})

    def _get_body(self, name: str, start: int = 0):
        kwargs = {"Bucket": self.bucket, "Key": name}
        if start:
            kwargs["Range"] = f"bytes={start}-"
        return self.client.get_object(**kwargs)["Body"]

    def _head(self, name: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=name)
        except Exception as exc:  # noqa: BLE001 - only "not there" is an answer
            if _not_found(exc):
                return None
            raise

    def _delete_objects(self, names: list[str]) -> None:
        """Delete objects (gone already is fine), up to 1000 in one request."""
        for start in range(0, len(names), 1000):
            chunk = names[start:start + 1000]
            if len(chunk) == 1:
                self.client.delete_object(Bucket=self.bucket, Key=chunk[0])
            elif chunk:
                self.client.delete_objects(Bucket=self.bucket,
                                           Delete={"Objects": [{"Key": n} for n in chunk], "Quiet": True})

    def uploads(self, name_prefix: str = "") -> list[dict]:
        """Multipart uploads in progress under the store's prefix (or under ``name_prefix``)."""
        found, kwargs = [], {"Bucket": self.bucket, "Prefix": name_prefix or self.prefix}
        while True:
            page = self.client.list_multipart_uploads(**kwargs)
            found.extend(page.get("Uploads", []))
            if not page.get("IsTruncated"):
                return found
            kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")

    def list_parts(self, name: str, upload_id: str) -> list[dict]:
        """The parts of one multipart upload, in order ({PartNumber, ETag, Size})."""
        found, kwargs = [], {"Bucket": self.bucket, "Key": name, "UploadId": upload_id}
        while True:
            page = self.client.list_parts(**kwargs)
            found.extend(page.get("Parts", []))
            if not page.get("IsTruncated"):
                return sorted(found, key=lambda p: p["PartNumber"])
            kwargs["PartNumberMarker"] = page["NextPartNumberMarker"]

    def abort_upload(self, name: str, upload_id: str) -> None:
        """Abort one multipart upload (its parts go)."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001
            if not _not_found(exc):
                raise

    def _remove_partial(self, name: str) -> None:
        """Abort every multipart upload of ``name``; delete its tail and block list."""
        for upload in self.uploads(name):
            if upload["Key"] == name:
                self.abort_upload(name, upload["UploadId"])
        self._delete_objects([name + ".part", name + ".blocks"])

    # -- the blob-store interface

    def open_partial(self, job_id: str, key: str, offset: int, crc32: int, stamp: str | None,
                     recover: bool = True, size: int | None = None) -> S3PartialWriter:
        """Open ``key``'s partial at the recorded ``offset`` (see ``blobs.BlobStore.open_partial``).

        A resume reads the tail object's metadata, the upload's part list and the block
        list: no byte of the prefix is read again. A tail object further on than the
        record (a crash between its PutObject and the record) is taken as it is, with
        ``needs_record`` set. ``PrefixLost`` if the bucket holds less than the record says.
        """
        try:
            return self._open_partial(job_id, key, offset, crc32, recover, size)
        except (PrefixLost, FiledockError):
            raise
        except Exception as exc:  # noqa: BLE001 - the network or the store said no
            raise _unavailable("the object store could not open the partial", exc) from None

    def _open_partial(self, job_id: str, key: str, offset: int, crc32: int, recover: bool,
                      size: int | None) -> S3PartialWriter:
        name = self._name(job_id, key)
        part_size = part_size_for(size or 0)
        if recover and (head := self._head(name)) is not None:
            # completed and verified, but never recorded: hashed again from the bucket
            hasher = ContentHasher()
            with self.open_complete(job_id, key) as f:
                from filedock.digest import hash_stream
                hash_stream(f, head["ContentLength"], hasher=hasher)
            writer = S3PartialWriter(self, name, part_size, hasher, complete=True)
            writer.needs_record = (hasher.offset, hasher.crc32) != (offset, crc32)
            return writer
        if not offset:
            return S3PartialWriter(self, name, part_size, ContentHasher(), reset=True)
        try:
            tail = self.client.get_object(Bucket=self.bucket, Key=name + ".part")
        except Exception as exc:  # noqa: BLE001
            if _not_found(exc):
                raise PrefixLost("no tail object in the bucket") from None
            raise
        state = TailState.of(tail.get("Metadata", {}))
        if state.offset < offset:
            tail["Body"].close()
            raise PrefixLost(f"the bucket holds {state.offset} bytes, not {offset}")
        if state.part_size != part_size:
            part_size = state.part_size  # chosen when the upload began: keep it
        full = state.parts * part_size
        parts = []
        if state.parts:
            listed = {p["PartNumber"]: p for p in self.list_parts(name, state.upload_id)}
            for number in range(1, state.parts + 1):
                p = listed.get(number)
                if p is None or p["Size"] != part_size:
                    tail["Body"].close()
                    raise PrefixLost(f"part {number} of the multipart upload is missing")
                parts.append({"PartNumber": number, "ETag": p["ETag"]})
        whole = state.offset // BLOCK_SIZE
        blocks = self.client.get_object(Bucket=self.bucket, Key=name + ".blocks")["Body"].read()
        if len(blocks) < whole * BLOCK_HASH_SIZE:
            tail["Body"].close()
            raise PrefixLost("the block list is shorter than the partial")
        blocks = blocks[:whole * BLOCK_HASH_SIZE]
        spool = self.spool()
        hasher = ContentHasher(state.crc32, blocks)
        got, in_block_from = 0, whole * BLOCK_SIZE - full  # the unfinished block starts here in the tail
        body = tail["Body"]
        try:
            while True:
                chunk = body.read(1 << 20)
                if not chunk:
                    break
                spool.write(chunk)
                lo = max(in_block_from - got, 0)
                if lo < len(chunk):
                    hasher.update(chunk[lo:], crc=False)
                got += len(chunk)
        finally:
            body.close()
        if got != state.offset - full:
            spool.close()
            raise PrefixLost(f"the tail object holds {got} bytes, not {state.offset - full}")
        writer = S3PartialWriter(self, name, part_size, hasher, state.upload_id, parts, blocks, spool)
        writer.needs_record = (state.offset, state.crc32) != (offset, crc32)
        return writer

    def open_batch(self, job_id: str) -> S3BatchWriter:
        """A writer for one ``BATCH``: each file one PutObject when the batch publishes."""
        _check_key(job_id)
        return S3BatchWriter(self, job_id)

    def unrecorded_size(self, job_id: str, key: str) -> int:
        """Bytes of a complete object whose completion was never recorded (0: none)."""
        head = self._head(self._name(job_id, key))
        return head["ContentLength"] if head else 0

    def complete_size(self, job_id: str, key: str) -> int | None:
        """The complete object's size, or None if there is none."""
        head = self._head(self._name(job_id, key))
        return head["ContentLength"] if head else None

    def free_bytes(self) -> int:
        """Object storage has no disk to fill that we can see: effectively unbounded."""
        return 1 << 62

    def open_complete(self, job_id: str, key: str) -> S3ReadStream:
        """A complete object as a stream, read from the bucket in bounded chunks."""
        name = self._name(job_id, key)
        head = self._head(name)
        if head is None:
            raise FileNotFoundError(f"no object for {key[:8]}")
        return S3ReadStream(self, name, head["ContentLength"])

    def discard(self, job_id: str, key: str) -> None:
        """Abort the partial's multipart upload; delete its tail and block list."""
        self._remove_partial(self._name(job_id, key))

    def delete_file(self, job_id: str, key: str) -> None:
        """Delete everything stored for one file."""
        self.discard(job_id, key)
        self._delete_objects([self._name(job_id, key)])

    def forget(self, job_id: str, key: str) -> None:
        """Delete whatever an upload of a deleted file left."""
        self.delete_file(job_id, key)

    def delete_job(self, job_id: str) -> None:
        """Delete every object and multipart upload of a job."""
        job_prefix = f"{self.prefix}jobs/{_check_key(job_id)}/"
        for upload in self.uploads(job_prefix):
            self.abort_upload(upload["Key"], upload["UploadId"])
        self._delete_objects([obj["Key"] for obj in self.objects(job_prefix)])

    def objects(self, name_prefix: str | None = None) -> list[dict]:
        """Every object under the prefix ({Key, Size})."""
        found, kwargs = [], {"Bucket": self.bucket, "Prefix": self.prefix if name_prefix is None else name_prefix}
        while True:
            page = self.client.list_objects_v2(**kwargs)
            found.extend(page.get("Contents", []))
            if not page.get("IsTruncated"):
                return found
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def sweep_staging(self, active_tags: set[str], older_than: float) -> int:
        """Batches are spooled in this process's own temporary dir, gone with it: nothing to sweep."""
        return 0

    def staged_files(self) -> list[Path]:
        """Nothing outlives the process (see ``sweep_staging``)."""
        return []

    def inventory(self) -> list[StoredObject]:
        """Everything under the prefix, for ``fsck``: objects and multipart uploads."""
        found = []
        for obj in self.objects():
            found.append(self._classify(obj["Key"], obj.get("Size", 0)))
        for upload in self.uploads():
            item = self._classify(upload["Key"], 0)
            item.kind, item.upload_id = "upload", upload["UploadId"]
            found.append(item)
        return found

    def _classify(self, name: str, size: int) -> StoredObject:
        rest = name[len(self.prefix):]
        parts = rest.split("/")
        if len(parts) == 3 and parts[0] == "jobs":
            base, _, ext = parts[2].partition(".")
            kind = {"": "complete", "part": "tail", "blocks": "blocks"}.get(ext, "other")
            return StoredObject(parts[1], base, kind, size, f"s3://{self.bucket}/{name}")
        return StoredObject("", rest, "other", size, f"s3://{self.bucket}/{name}")

    def tail_state(self, job_id: str, key: str) -> TailState | None:
        """The last checkpoint of a partial, as its tail object says (None: no tail object)."""
        head = self._head(self._name(job_id, key) + ".part")
        return TailState.of(head.get("Metadata", {})) if head else None


def _safe_url(url: str) -> str:
    """The URL without a query (which may name a profile): for messages."""
    return url.split("?", 1)[0]


def s3_client_for(url: str) -> tuple[Any, str, str]:
    """A boto3 client, the bucket and the prefix for an ``s3://`` URL (``bad-blobs-url`` if unusable)."""
    parts = urlsplit(url)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if parts.scheme != "s3" or not _BUCKET_RE.fullmatch(bucket or "") or not _PREFIX_RE.fullmatch(prefix) \
            or ".." in prefix.split("/"):
        raise FiledockError(ErrorCode.BAD_BLOBS_URL,
                            f"--blobs: not s3://bucket/prefix?endpoint=URL&region=R: {_safe_url(url)[:200]!r}")
    try:
        query = parse_qs(parts.query, strict_parsing=bool(parts.query))
    except ValueError:
        raise FiledockError(ErrorCode.BAD_BLOBS_URL, "--blobs: the URL's query is not name=value pairs") from None
    unknown = set(query) - {"endpoint", "region", "profile"}
    if unknown:
        raise FiledockError(ErrorCode.BAD_BLOBS_URL,
                            f"--blobs: unknown URL parameter {sorted(unknown)[0]!r} (endpoint, region, profile)")
    endpoint = query.get("endpoint", [None])[-1]
    if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
        raise FiledockError(ErrorCode.BAD_BLOBS_URL, "--blobs: endpoint= is an http:// or https:// URL")
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    config = Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32,
                    connect_timeout=10, read_timeout=120,
                    s3={"addressing_style": "path"} if endpoint else None)
    try:
        session = boto3.session.Session(profile_name=query.get("profile", [None])[-1])
        client = session.client("s3", endpoint_url=endpoint, region_name=query.get("region", [None])[-1],
                                config=config)
    except BotoCoreError as exc:
        raise FiledockError(ErrorCode.BAD_BLOBS_URL, f"--blobs: {exc}") from None
    return client, bucket, prefix


__all__ = ["MIN_PART", "S3BlobStore", "S3PartialWriter", "S3ReadStream", "StoredObject", "TailState",
           "part_size_for", "s3_client_for"]
