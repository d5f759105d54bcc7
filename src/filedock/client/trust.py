"""The TLS context filedock's clients make themselves, marked so the data connection can take its fast TLS.

Only the standard library here: the CLI imports this for every command, and pyOpenSSL (``tls.py``)
only once a data connection speaks TLS.
"""

from __future__ import annotations

import ssl

from filedock.errors import ErrorCode, FiledockError


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


class CertificateRefused(FiledockError):
    """The data port's certificate failed verification: ``verify_code`` is OpenSSL's (62: host name
    mismatch, 64: IP address mismatch), ``why`` its words."""

    def __init__(self, verify_code: int, why: str) -> None:
        super().__init__(ErrorCode.TLS_FAILED, why)
        self.verify_code, self.why = verify_code, why
