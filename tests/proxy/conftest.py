"""Fixtures for the proxy tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from proxy_harness import Cluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Proxies and fake nodes on loopback, all stopped when the test ends."""
    running = Cluster()
    yield running
    running.close()
