"""The upload page's files: ``/upload`` and ``/static/<name>``, served by the control API.

The files in ``static/`` are built by ``make web`` from ``web/`` (Uppy bundled by esbuild) and
checked in, so the server needs no Node. They hold no data and need no token: the page asks
the API and the tus endpoint with the token the user gives it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

STATIC_DIR = Path(__file__).with_name("static")
"""Where ``make web`` writes the bundle; the package ships it."""

UPLOAD_PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                   "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""The page loads from its own server only, and talks to its own server only."""

_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8"}


@dataclass(frozen=True)
class StaticFile:
    """One file of the page: its bytes and its content type."""

    body: bytes
    content_type: str


@functools.lru_cache(maxsize=1)
def _static_files() -> dict[bytes, StaticFile]:
    # the names come from the package's folder, never from a request: a path is looked up, not joined
    files: dict[bytes, StaticFile] = {}
    for path in sorted(STATIC_DIR.glob("*")) if STATIC_DIR.is_dir() else []:
        content_type = _CONTENT_TYPES.get(path.suffix)
        if path.is_file() and content_type:
            files[b"/static/" + path.name.encode("utf-8")] = StaticFile(path.read_bytes(), content_type)
    if b"/static/upload.html" in files:
        files[b"/upload"] = files[b"/static/upload.html"]
    return files


def upload_page_file(path: bytes) -> StaticFile | None:
    """The page's file at request path ``path`` (``/upload``, ``/static/upload.js``, ...), or None."""
    return _static_files().get(path)
