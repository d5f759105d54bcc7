"""Fixtures shared by the test suites."""

from __future__ import annotations

import threading

import pytest

from tests.engines.postgres import postgres_dsn, postgres_server  # noqa: F401 (fixtures)
# once here, not in each module: a module that imports a session fixture gets its own instance (one
# SeaweedFS per module, six in one run)
from tests.engines.seaweedfs import s3_bucket, seaweedfs  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def reactor_thread():
    """The global Twisted reactor, running in a daemon thread for the whole test session.

    Tests talk to it with ``reactor.callFromThread`` and
    ``twisted.internet.threads.blockingCallFromThread``; anything that touches the
    reactor (listening, Deferreds, system event triggers) must go through those.
    The reactor is stopped, and its shutdown triggers run, when the session ends.
    """
    from twisted.internet import reactor

    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                              name="twisted-reactor", daemon=True)
    thread.start()
    yield reactor
    reactor.callFromThread(reactor.stop)
    thread.join(timeout=10)
