"""The upload page's checked-in bundle (src/filedock/server/static/) and how the API serves it.

The bundle is built by ``make web`` from web/ and checked in, so running a server needs no
Node; the first test rebuilds it (esbuild from web/package-lock.json, installed by
``make test``) and requires the same bytes, so the checked-in files cannot drift from web/src.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from filedock.server.uploadpage import STATIC_DIR

WEB_DIR = Path(__file__).resolve().parents[2] / "web"


def test_checked_in_bundle_is_what_make_web_builds(tmp_path):
    """``node web/build.mjs`` into a temporary folder gives byte for byte the files in static/."""
    node = shutil.which("node")
    if not node or not (WEB_DIR / "node_modules" / "esbuild" / "package.json").exists():
        why = ("rebuilding the upload page needs Node.js >= 18 with npm (Debian: apt-get install nodejs npm); "
               "then `make test` installs esbuild and Uppy with `npm ci` in web/")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    run = subprocess.run([node, str(WEB_DIR / "build.mjs"), str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == sorted(p.name for p in STATIC_DIR.iterdir())
    for name in built:
        assert (tmp_path / name).read_bytes() == (STATIC_DIR / name).read_bytes(), f"{name}: run `make web`"


def test_page_loads_nothing_from_elsewhere():
    """The HTML and CSS name no other server: scripts, styles and images come from the page's own."""
    html = (STATIC_DIR / "upload.html").read_text()
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["/static/upload.css", "/", "/upload", "/static/upload.js"]
    css = (STATIC_DIR / "upload.css").read_text()
    assert not [u for u in re.findall(r"url\(\s*['\"]?([^'\")]+)", css) if not u.startswith("data:")]
    assert "@import" not in css


def get(server, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    address = urlsplit(server.url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def test_api_serves_the_page_without_a_token_under_a_strict_policy(server):
    """``/upload`` and its ``/static/`` files need no token; the page may load and connect to its own
    server only; a path that names no file of the bundle is not a file (no path is built from it)."""
    status, headers, body = get(server, "/upload")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert body == (STATIC_DIR / "upload.html").read_bytes()
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self';" in policy and "connect-src 'self';" in policy
    status, headers, body = get(server, "/static/upload.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert body == (STATIC_DIR / "upload.js").read_bytes()
    assert headers["x-content-type-options"] == "nosniff"
    assert get(server, "/static/upload.css")[0] == 200
    for path in ("/static/..%2Fapi.py", "/static/../api.py", "/static/", "/static/nothing.js"):
        assert get(server, path)[0] == 401  # not a page file: the API asks for a token, as for any path
        assert get(server, path, server.token)[0] == 404
