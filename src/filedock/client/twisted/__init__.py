"""The Twisted client: every call returns a ``Deferred``.

``TxDataPortClient`` (the data port), ``TxApiClient`` (the control API) and
``upload_job`` (a job's files). ``filedock.client.txclient`` is the same names,
where they have always been importable.
"""

from filedock.client.twisted.api import TxApiClient
from filedock.client.twisted.dataport import TxDataPortClient
from filedock.client.twisted.job import upload_job

__all__ = ["TxApiClient", "TxDataPortClient", "upload_job"]
