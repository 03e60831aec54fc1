"""A RedisBroker node in a process of its own, for tests that SIGKILL it.

``python -m tests.support.broker_node URL PREFIX NAME ROOM USER`` starts a
node with short heartbeats, adds USER's presence in ROOM and a connection
of USER, prints ``ready``, and waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from wsserver.brokers.base import NodeStats, Publication
from wsserver.brokers.redis import RedisBroker

HEARTBEAT = 0.2
NODE_TTL = 1.0


class QuietSink:
    """A sink that only reports counts."""

    def on_publication(self, publication: Publication) -> None: ...
    def on_disconnect(self, user: str, code: int, reason: str) -> None: ...
    def on_presence_lost(self, room: str, user: str) -> None: ...
    def on_resubscribed(self, rooms: Sequence[str]) -> None: ...

    def node_stats(self) -> NodeStats:
        return NodeStats(1, 1, 0.0)


async def main(url: str, prefix: str, name: str, room: str, user: str) -> None:
    broker = RedisBroker(
        url, name, prefix=prefix, heartbeat_interval=HEARTBEAT, node_ttl=NODE_TTL,
        probe_interval=0.5,
    )
    await broker.start(QuietSink())
    await broker.presence_add(room, user)
    await broker.user_connect(user, 10)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
