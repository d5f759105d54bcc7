"""Fixtures for tests that run a real server process on loopback."""

from __future__ import annotations

import pytest

from tests.integration.harness import ServerProcess


@pytest.fixture
def server(tmp_path):
    """A running server with its own data dir; stopped after the test."""
    proc = ServerProcess(tmp_path / "data")
    proc.start()
    yield proc
    proc.stop()
