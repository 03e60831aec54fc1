"""Fixtures for the broker tests: both brokers behind one harness.

The contract tests take ``harness`` and run once per broker (``memory``,
``redis``). Each test body is a coroutine run with :func:`run` (the brokers
are pure asyncio; no Tornado loop). The Redis brokers share one session
``redis-server`` and get a key prefix of their own per test, so tests do not
see each other's keys; tests that stop or freeze Redis start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.redis_server import RedisServer, require_redis_server
from wsserver.brokers.base import Broker, NodeStats, Publication
from wsserver.brokers.memory import MemoryBroker
from wsserver.brokers.redis import RedisBroker

T = TypeVar("T")
TEST_TIMEOUT = 30.0
WAIT_TIMEOUT = 5.0
_prefixes = itertools.count()


def run(coro: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Run a test's coroutine on a fresh event loop, bounded.

    On timeout the stacks of every task are printed (what hung), then the
    test fails.
    """

    async def bounded() -> T:
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait([task], timeout=timeout)
        if not done:
            stacks = io.StringIO()
            for other in asyncio.all_tasks():
                other.print_stack(file=stacks)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise AssertionError(f"test did not finish in {timeout} s; tasks:\n{stacks.getvalue()}")
        return task.result()

    return asyncio.run(bounded())


@dataclass
class RecordingSink:
    """A BrokerSink that records every callback and lets a test await them."""

    connections: int = 0
    users: int = 0
    publications: list[Publication] = field(default_factory=list)
    disconnects: list[tuple[str, int, str]] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)
    resubscribed: list[list[str]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_publication(self, publication: Publication) -> None:
        self.publications.append(publication)
        self._changed.set()

    def on_disconnect(self, user: str, code: int, reason: str) -> None:
        self.disconnects.append((user, code, reason))
        self._changed.set()

    def on_presence_lost(self, room: str, user: str) -> None:
        self.lost.append((room, user))
        self._changed.set()

    def on_resubscribed(self, rooms: Sequence[str]) -> None:
        self.resubscribed.append(list(rooms))
        self._changed.set()

    def node_stats(self) -> NodeStats:
        return NodeStats(self.connections, self.users, 1.5)

    def payloads(self, room: str | None = None) -> list[bytes]:
        return [p.payload for p in self.publications if room is None or p.room == room]

    async def wait(self, done: Callable[[], bool], timeout: float = WAIT_TIMEOUT) -> None:
        """Until ``done()`` holds after some callback; AssertionError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    async def barrier(self, broker: Broker, room: str) -> None:
        """Until a marker published in ``room`` (subscribed) has come back.

        One pub/sub connection delivers in order, so every publication sent
        before the marker has been delivered (or will never be) by then.
        """
        marker = b'{"marker":%d}' % len(self.publications)
        await broker.publish(room, marker)
        await self.wait(lambda: marker in self.payloads(room))


class Harness:
    """Makes brokers of one kind; time passes for real (Redis) or by a fake clock."""

    def __init__(self, kind: str, redis: RedisServer | None) -> None:
        self.kind = kind
        self.redis = redis
        self.now = 1000.0
        self.prefix = f"t{next(_prefixes)}"
        self._memory: MemoryBroker | None = None

    def _clock(self) -> float:
        return self.now

    def make(self, node: str = "n1", **options: Any) -> Broker:
        if self.kind == "memory":
            # One process: every "node" is the same broker's state.
            return MemoryBroker(node, clock=self._clock)
        assert self.redis is not None
        defaults: dict[str, Any] = {
            "prefix": self.prefix, "probe_interval": 2.0, "heartbeat_interval": 0.2,
            "node_ttl": 1.0,
        }
        defaults.update(options)
        return RedisBroker(self.redis.url, node, **defaults)

    @contextlib.asynccontextmanager
    async def started(self, node: str = "n1", **options: Any) -> AsyncIterator[
        tuple[Broker, RecordingSink]
    ]:
        broker = self.make(node, **options)
        sink = RecordingSink()
        await broker.start(sink)
        try:
            yield broker, sink
        finally:
            await broker.close()

    async def elapse(self, seconds: float) -> None:
        """Let ``seconds`` pass for the broker (TTL tests)."""
        if self.kind == "memory":
            self.now += seconds
        else:
            await asyncio.sleep(seconds)


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
