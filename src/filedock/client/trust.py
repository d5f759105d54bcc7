"""The TLS context filedock's clients make themselves, marked so the data connection can take its fast TLS.

Only the standard library here: the CLI imports this for every command, and pyOpenSSL (``tls.py``)
only once a data connection speaks TLS.
"""

from __future__ import annotations

import ssl


class TrustedContext(ssl.SSLContext):
    """An ``ssl.SSLContext`` filedock made from ``cafile`` (or the system's roots when None): the
    HTTP client uses it as it is, and the data connection rebuilds the same trust on pyOpenSSL
    (``tls.fast_context``)."""

    cafile: str | None = None


def client_context(cafile: str | None = None) -> TrustedContext:
    """What ``ssl.create_default_context(cafile=cafile)`` makes, marked as filedock's own."""
    ctx = TrustedContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, host names checked
    if cafile:
        ctx.load_verify_locations(cafile=cafile)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.cafile = cafile
    return ctx
