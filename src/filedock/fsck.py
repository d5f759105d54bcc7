"""``filedock fsck``: do the store and the files on disk agree?

Checks every file record against the data dir (sizes, digests, partials) and every
file in the data dir against the records (orphans, stray partials). ``repair``
fixes what is safe: it never deletes a byte that might be someone's only copy;
suspect files are moved to ``<data>/lost+found/`` instead.

Run it with the server stopped when repairing.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from filedock.digest import hash_file
from filedock.store.blobs import BlobStore
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


def _mismatch(r: FileRecord, crc32: int, digest: str) -> str:
    """What differs between a record and its bytes: the digest, or (when only it differs) the CRC-32."""
    if digest != r.digest:
        return f"recorded {r.digest}, disk has {digest}"
    return f"recorded CRC-32 {format_crc(r.crc32)}, disk has {format_crc(crc32)} (the digest agrees)"


def run_fsck(data_dir: str | Path, repair: bool = False, verify: bool = True,
             metadata: str | None = None) -> tuple[Fsck, list[Finding]]:
    """Check (and with ``repair``, mend) the data dir ``data_dir`` against its metadata store
    (the data dir's SQLite database, or the one ``metadata`` names)."""
    from filedock.server.service import data_dir_in_use, lock_data_dir, open_store

    # mending under a live server would race with it: --repair holds the lock throughout; a
    # read-only check only asks, so a server may start while it runs (hours, on a big store)
    lock = lock_data_dir(data_dir) if repair else -1
    running = lock < 0 and data_dir_in_use(data_dir)
    store = open_store(data_dir, metadata)
    blobs = BlobStore(data_dir)
    try:
        fsck = Fsck(store, blobs, repair=repair, verify=verify, server_running=running)
        return fsck, fsck.run()
    finally:
        blobs.close()  # its work queue's threads, if a repair started any
        store.close()
        if lock >= 0:
            os.close(lock)
