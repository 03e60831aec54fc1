"""Both brokers behind one harness, for the broker contract tests (``tests/brokers``).

A :class:`Harness` makes brokers of one kind (``memory`` or ``redis``); a
:class:`RecordingSink` records every callback and lets a test await them.
The Redis brokers of one harness get a key prefix of their own, so tests
sharing one ``redis-server`` do not see each other's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.support.redis_server import RedisServer
from wsserver.brokers.base import Broker, NodeStats, Publication
from wsserver.brokers.memory import MemoryBroker
from wsserver.brokers.redis import RedisBroker

WAIT_TIMEOUT = 5.0
_prefixes = itertools.count()


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
