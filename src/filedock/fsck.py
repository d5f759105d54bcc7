"""``filedock fsck``: do the store and the files on disk agree?

Checks every file record against the data dir (sizes, digests, partials) and every
file in the data dir against the records (orphans, stray partials). ``repair``
fixes what is safe: it never deletes a byte that might be someone's only copy;
suspect files are moved to ``<data>/lost+found/`` instead.

Run it with the server stopped when repairing.

With blobs in a bucket (``--blobs s3://...``), ``BucketFsck`` checks the records
against the objects and the multipart uploads: a multipart upload no record owns is
reported (``--repair`` aborts it), and so are stray tail and block-list objects
(``--repair`` deletes them). Several servers may share the bucket: stop them all
before ``--repair``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from filedock.digest import hash_file, hash_stream
from filedock.store.blobs import BlobStore
from filedock.store.blobstore import open_blob_store
from filedock.store.model import FILE_COMPLETE, FileRecord
from filedock.store.metadata import MetadataStore
from filedock.wire import format_crc


@dataclass(frozen=True)
class Finding:
    """One disagreement. ``repaired`` says what ``--repair`` did about it, if anything."""

    kind: str
    path: str
    detail: str
    key: str | None = None
    repaired: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


class Fsck:
    """One check of a data dir. ``run()`` returns the findings; nothing found means healthy."""

    def __init__(self, store: MetadataStore, blobs: BlobStore, repair: bool = False, verify: bool = True,
                 server_running: bool = False) -> None:
        self.store, self.blobs, self.repair, self.verify = store, blobs, repair, verify
        self.server_running = server_running  # then staging files may belong to live batches
        self.findings: list[Finding] = []
        self.checked_files = 0
        self.checked_bytes = 0

    def run(self) -> list[Finding]:
        records = self.store.all_files()
        known: set[Path] = set()
        for record in records:
            known.update(self._check_record(record))
        self._check_disk(known, {r.job_id for r in records} | {j.id for j in self.store.list_jobs()})
        return self.findings

    def _found(self, kind: str, path: Path, detail: str, key: str | None = None, fix=None) -> None:
        repaired = None
        if self.repair and fix is not None:
            repaired = fix()
        self.findings.append(Finding(kind, str(path), detail, key, repaired))

    def _lost_and_found(self, path: Path) -> str:
        target = self.blobs.root / "lost+found" / f"{path.parent.name}-{path.name}-{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), target)
        return f"moved to {target}"

    def _check_record(self, r: FileRecord) -> list[Path]:
        final = self.blobs.final_path(r.job_id, r.blob_name)
        part = self.blobs.part_path(r.job_id, r.blob_name)
        blocks = self.blobs.blocks_path(r.job_id, r.blob_name)
        self.checked_files += 1
        if r.state == FILE_COMPLETE:
            self._check_complete(r, final)
            if part.exists():
                self._found("stray-partial", part, "a partial next to a complete file", r.key,
                            lambda: (self.blobs.discard(r.job_id, r.blob_name), "deleted")[1])
        else:
            if final.exists():
                def unpublish():
                    os.replace(final, part)
                    return "renamed back to a partial; the next resume re-hashes it"
                self._found("unrecorded-complete", final,
                            "a complete file whose completion was never recorded (crash between rename "
                            "and record)", r.key, unpublish)
            elif r.received and (not part.exists() or part.stat().st_size < r.received):
                have = part.stat().st_size if part.exists() else 0
                self._found("partial-short", part, f"recorded {r.received} durable bytes, disk has {have}",
                            r.key, lambda: (self.store.reset_file(r.key), "reset to 0")[1])
        return [final, part, blocks]

    def _check_complete(self, r: FileRecord, final: Path) -> None:
        if not final.exists():
            self._found("missing", final, "recorded complete, not on disk", r.key,
                        lambda: (self.store.reset_file(r.key, force=True), "reset to pending")[1])
            return
        size = final.stat().st_size
        if size != r.size:
            self._found("size-mismatch", final, f"recorded {r.size} bytes, disk has {size}", r.key,
                        lambda: self._quarantine(r, final))
            return
        if self.verify:
            h = hash_file(final)
            self.checked_bytes += size
            if h.hexdigest() != r.digest or h.crc32 != r.crc32:
                self._found("digest-mismatch", final, _mismatch(r, h.crc32, h.hexdigest()), r.key,
                            lambda: self._quarantine(r, final))

    def _quarantine(self, r: FileRecord, path: Path) -> str:
        moved = self._lost_and_found(path)
        self.store.reset_file(r.key, force=True)
        return f"{moved}; reset to pending"

    def _check_disk(self, known: set[Path], job_ids: set[str]) -> None:
        jobs_dir = self.blobs.root / "jobs"
        for job_dir in sorted(jobs_dir.iterdir()) if jobs_dir.exists() else []:
            if job_dir.name not in job_ids:
                self._found("orphan-job-dir", job_dir, "a job directory with no job",
                            fix=lambda d=job_dir: self._lost_and_found(d))
                continue
            for path in sorted(job_dir.iterdir()):
                if path not in known:
                    self._found("orphan", path, "a file no record names",
                                fix=lambda p=path: self._lost_and_found(p))
        for path in [] if self.server_running else sorted(self.blobs.staged_files()):
            self._found("staging-leftover", path, "a file of a batch that never finished",
                        fix=lambda p=path: self._unlink(p))

    @staticmethod
    def _unlink(path: Path) -> str:
        path.unlink(missing_ok=True)
        return "deleted"


class BucketFsck(Fsck):
    """One check of a metadata store against a bucket (``s3.S3BlobStore``)."""

    def run(self) -> list[Finding]:
        records = self.store.all_files()
        job_ids = {r.job_id for r in records} | {j.id for j in self.store.list_jobs()}
        inventory = self.blobs.inventory()
        objects = {(o.job_id, o.name, o.kind): o for o in inventory if o.kind != "upload"}
        owned: dict[tuple[str, str], FileRecord] = {}
        tails = {}
        for r in records:
            owned[(r.job_id, r.blob_name)] = r
            self.checked_files += 1
            tails[(r.job_id, r.blob_name)] = self._check_object_record(r, objects)
        for item in inventory:
            if item.kind == "upload":
                self._check_upload(item, owned.get((item.job_id, item.name)), tails.get((item.job_id, item.name)))
            elif item.kind == "other":
                if not item.name.startswith("lost+found/"):
                    self._found("orphan", item.where, "an object filedock did not make under its prefix")
            elif (item.job_id, item.name) not in owned:
                kind = "orphan-job-dir" if item.job_id not in job_ids else "orphan"
                if item.kind == "complete":
                    self._found(kind, item.where, "an object no record names", fix=lambda i=item: self._quarantine_object(i))
                else:
                    self._found("stray-partial", item.where, f"a {item.kind} object no record names",
                                fix=lambda i=item: (self.blobs._delete_objects([self._object_name(i)]), "deleted")[1])
        return self.findings

    def _object_name(self, item) -> str:
        return item.where.split("/", 3)[3]

    def _check_object_record(self, r: FileRecord, objects: dict):
        obj = objects.get((r.job_id, r.blob_name, "complete"))
        where = f"s3://{self.blobs.bucket}/{self.blobs._name(r.job_id, r.blob_name)}"
        has_partial = any((r.job_id, r.blob_name, k) in objects for k in ("tail", "blocks"))
        if r.state == FILE_COMPLETE:
            if obj is None:
                self._found("missing", where, "recorded complete, not in the bucket", r.key,
                            lambda: (self.store.reset_file(r.key, force=True), "reset to pending")[1])
            elif obj.size != r.size:
                self._found("size-mismatch", where, f"recorded {r.size} bytes, the bucket has {obj.size}", r.key,
                            lambda: self._quarantine_record(r, obj))
            elif self.verify:
                with self.blobs.open_complete(r.job_id, r.blob_name) as f:
                    h = hash_stream(f, obj.size)
                self.checked_bytes += obj.size
                if h.hexdigest() != r.digest or h.crc32 != r.crc32:
                    self._found("digest-mismatch", where, _mismatch(r, h.crc32, h.hexdigest()), r.key,
                                lambda: self._quarantine_record(r, obj))
            if has_partial:
                self._found("stray-partial", where + ".part", "a partial next to a complete file", r.key,
                            lambda: (self.blobs.discard(r.job_id, r.blob_name), "deleted")[1])
            return None
        if obj is not None:
            self._found("unrecorded-complete", where, "a complete object whose completion was never recorded "
                        "(crash between completing it and the record)", r.key,
                        lambda: "kept: the next resume takes it back whole and re-hashes it")
            return None
        tail = self.blobs.tail_state(r.job_id, r.blob_name) if has_partial or r.received else None
        if r.received and (tail is None or tail.offset < r.received):
            self._found("partial-short", where + ".part",
                        f"recorded {r.received} durable bytes, the bucket has {tail.offset if tail else 0}", r.key,
                        lambda: (self.store.reset_file(r.key), "reset to 0")[1])
        return tail

    def _check_upload(self, item, record: FileRecord | None, tail) -> None:
        def abort() -> str:
            self.blobs.abort_upload(self._object_name(item), item.upload_id)
            return "aborted"
        if record is None:
            self._found("orphan-upload", item.where, f"a multipart upload ({item.upload_id[:12]}...) no record owns",
                        fix=abort)
        elif record.state == FILE_COMPLETE:
            self._found("orphan-upload", item.where, "a multipart upload of a file recorded complete", record.key,
                        fix=abort)
        elif not self.server_running and (tail is None or tail.upload_id != item.upload_id):
            self._found("stray-upload", item.where, "a multipart upload no checkpoint names (parts sent after the "
                        "last checkpoint; a resume aborts it too)", record.key, fix=abort)

    def _quarantine_object(self, item) -> str:
        name = self._object_name(item)
        target = f"{self.blobs.prefix}lost+found/{item.job_id}-{item.name}-{int(time.time())}"
        self.blobs.client.copy_object(Bucket=self.blobs.bucket, Key=target,
                                      CopySource={"Bucket": self.blobs.bucket, "Key": name})
        self.blobs._delete_objects([name])
        return f"moved to s3://{self.blobs.bucket}/{target}"

    def _quarantine_record(self, r: FileRecord, obj) -> str:
        moved = self._quarantine_object(obj)
        self.store.reset_file(r.key, force=True)
        return f"{moved}; reset to pending"


def _mismatch(r: FileRecord, crc32: int, digest: str) -> str:
    """What differs between a record and its bytes: the digest, or (when only it differs) the CRC-32."""
    if digest != r.digest:
        return f"recorded {r.digest}, disk has {digest}"
    return f"recorded CRC-32 {format_crc(r.crc32)}, disk has {format_crc(crc32)} (the digest agrees)"


def run_fsck(data_dir: str | Path, repair: bool = False, verify: bool = True,
             metadata: str | None = None, blobs_url: str | None = None) -> tuple[Fsck, list[Finding]]:
    """Check (and with ``repair``, mend) the data dir ``data_dir`` against its metadata store
    (the data dir's SQLite database, or the one ``metadata`` names), its bytes where
    ``blobs_url`` says (default: the data dir)."""
    from filedock.server.service import data_dir_in_use, lock_data_dir, open_store

    # mending under a live server would race with it: --repair holds the lock throughout; a
    # read-only check only asks, so a server may start while it runs (hours, on a big store)
    lock = lock_data_dir(data_dir) if repair else -1
    running = lock < 0 and data_dir_in_use(data_dir)
    try:
        blobs = open_blob_store(blobs_url, data_dir) if blobs_url else BlobStore(data_dir)
    except BaseException:
        if lock >= 0:
            os.close(lock)
        raise
    store = open_store(data_dir, metadata)
    try:
        kind = Fsck if isinstance(blobs, BlobStore) else BucketFsck
        fsck = kind(store, blobs, repair=repair, verify=verify, server_running=running)
        return fsck, fsck.run()
    finally:
        blobs.close()  # its work queue's threads, if a repair started any
        store.close()
        if lock >= 0:
            os.close(lock)
