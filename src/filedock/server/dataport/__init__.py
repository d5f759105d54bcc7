"""The data port: a Twisted front end around ``filedock.wire.ServerConnection``.

``connection`` holds the protocol (event pump, timeouts, pausing, the error line)
and its factory; each request kind has its own module (``upload``, ``download``,
``abort``, ``batch``) whose object talks to the connection only through
``channel.IRequestChannel``; ``budget`` holds the connection budgets and ``stats``
the counters and the status view. Upload ownership lives in
``filedock.server.registry``.
"""

from filedock.server.dataport.abort import Abort
from filedock.server.dataport.batch import BatchUpload
from filedock.server.dataport.budget import UnauthenticatedBudget, peer_group
from filedock.server.dataport.channel import IRequestChannel, Request, RequestServices
from filedock.server.dataport.connection import DataPortFactory, DataPortProtocol, Lifecycle
from filedock.server.dataport.download import Download, FileProducer
from filedock.server.dataport.stats import DataPortStats
from filedock.server.dataport.upload import PartialFate, Upload

__all__ = [
    "Abort", "BatchUpload", "DataPortFactory", "DataPortProtocol", "DataPortStats", "Download", "FileProducer",
    "IRequestChannel", "Lifecycle", "PartialFate", "Request", "RequestServices", "UnauthenticatedBudget", "Upload",
    "peer_group",
]
