"""Fixtures of the chaos suite: the nodes of a scenario on a real broker.

``chaos_nodes(count, broker, *flags)`` starts ``count`` real ``python -m
wsserver`` processes (through ``run_server``, which stops them at the end) on
``memory`` or on the test's ``redis`` / ``persistent_redis``; the scenarios
themselves live in :mod:`tests.support.chaos`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.chaos import Nodes
from tests.support.redis_server import RedisServer, require_redis_server
from tests.support.servers import ServerFactory


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` of the test's own with ``appendonly yes``: a restart keeps
    every key."""
    require_redis_server()
    with RedisServer(tmp_path / "redis-aof", extra=("--appendonly", "yes")) as server:
        yield server


@pytest.fixture
def nodes_factory(run_server: ServerFactory, tmp_path: Path) -> Callable[..., Nodes]:
    """``nodes_factory(broker, *flags)`` → :class:`Nodes` (not started yet) whose
    processes ``run_server`` stops at the end."""

    def make(broker: str, *flags: str) -> Nodes:
        return Nodes(run_server, tmp_path / "nodes", broker, flags)

    return make
