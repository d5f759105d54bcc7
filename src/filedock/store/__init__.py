"""The job store: metadata (SQL, SQLite by default) and blobs (files in the data dir)."""

from filedock.store.blobs import BlobStore
from filedock.store.metadata import MetadataStore
from filedock.store.model import FileRecord, Job, Session
from filedock.store.sqlite import SQLiteStore

__all__ = ["BlobStore", "FileRecord", "Job", "MetadataStore", "SQLiteStore", "Session"]
