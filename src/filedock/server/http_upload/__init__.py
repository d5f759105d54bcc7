"""HTTP uploads on the API port (tus 1.0.0 and the IETF draft) at ``/files/``.

``HttpUploads`` is the front end the control API's site hands ``/files/`` requests
to; each request becomes an ``HttpExchange``, an ``IRequestChannel`` around the same
``Upload`` the data port uses. The protocol logic is in ``filedock.httpupload``.
"""

from filedock.server.http_upload.exchange import HttpExchange
from filedock.server.http_upload.front import GrantAuthority, HttpUploads

__all__ = ["GrantAuthority", "HttpExchange", "HttpUploads"]
