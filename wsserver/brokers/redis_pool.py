"""The connection pool behind :class:`~wsserver.brokers.redis.RedisBroker`, from its URL.

One Redis (``redis://``, ``rediss://``, ``unix://``): redis-py's
``BlockingConnectionPool``. Redis Sentinel (``redis+sentinel://``): the same
blocking pool whose connections ask the sentinels for the master's address
each time they connect (redis-py's ``SentinelConnectionPool``), so after a
failover the broker's reconnects reach the new master; until then they fail
like any outage and the broker backs off and retries.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from wsserver.brokers.redis_urls import is_sentinel, parse_sentinel_url


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel-managed pool that waits (bounded) for a free connection, as the
    single-Redis pool does, instead of failing when all are busy; closing it
    also closes the connections to the sentinels."""

    async def aclose(self) -> None:
        await super().aclose()
        await self.sentinel_manager.aclose()


def connection_pool(
    url: str, *, timeout: float, max_connections: int, **connection: Any
) -> ConnectionPool:
    """The pool for ``url``.

    Args:
        timeout: seconds to wait for a free connection, to connect, and for
            each answer (the sentinels' too).
        max_connections: bound on the pool's connections.
        connection: keyword arguments of every connection (``retry``,
            ``client_name``, ``protocol``...).
    """
    if not is_sentinel(url):
        pool: ConnectionPool = BlockingConnectionPool.from_url(
            url, timeout=timeout, socket_timeout=timeout, socket_connect_timeout=timeout,
            max_connections=max_connections, **connection,
        )
        return pool
    parsed = parse_sentinel_url(url)
    sentinels = Sentinel(
        parsed.sentinels,
        # No password: it is the master's (sentinels usually run without one).
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
    )
    return BlockingSentinelPool(  # type: ignore[no-untyped-call]
        parsed.master, sentinels,
        timeout=timeout, socket_timeout=timeout, socket_connect_timeout=timeout,
        max_connections=max_connections, db=parsed.db, username=parsed.username,
        password=parsed.password, ssl=parsed.tls, **connection,
    )
