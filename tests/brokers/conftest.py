"""Fixtures for the broker tests: both brokers behind one harness
(:mod:`tests.support.brokers`).

The contract tests take ``harness`` and run once per broker (``memory``,
``redis``). Each test body is a coroutine run with
:func:`tests.support.aio.run` (the brokers are pure asyncio; no Tornado
loop). The Redis brokers share one session ``redis-server`` and get a key
prefix of their own per test; tests that stop or freeze Redis start their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.brokers import Harness
from tests.support.redis_server import RedisServer, require_redis_server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session's contract tests (prefixes keep them apart)."""
    require_redis_server()
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test, to stop, restart or freeze."""
    require_redis_server()
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "memory":
        return Harness("memory", None)
    return Harness("redis", request.getfixturevalue("redis_server"))


@pytest.fixture
def redis_harness(redis_server: RedisServer) -> Harness:
    return Harness("redis", redis_server)
