"""The Redis broker's command side: a bounded pool, the scripts, errors as BrokerUnavailable.

Every read-modify-write is one Lua script (:mod:`wsserver.brokers.redis_scripts`),
run with EVALSHA. Publishes are auto-pipelined: those made while a batch is in
flight go out together as the next batch, one round trip, in the order made.
Every command is bounded by the command timeout and raises
:class:`BrokerUnavailable` when Redis cannot be reached.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wsserver.brokers import redis_scripts as lua
from wsserver.brokers.base import BrokerUnavailable
from wsserver.brokers.redis_pool import connection_pool

log = logging.getLogger("wsserver.broker")

T = TypeVar("T")

#: Errors that mean "Redis cannot be reached or cannot take writes right now".
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # includes BusyLoadingError (Redis loading its dataset)
    RedisTimeoutError,
    ReadOnlyError,  # a replica after a failover, before it is promoted
    OSError,
    asyncio.TimeoutError,
)

#: Command connections per node at most: a burst (a thousand members leaving at
#: once) waits its turn for one (bounded by command_timeout), never piles up more.
MAX_CONNECTIONS = 16
#: Concurrent commands a node needs in steady state; past that, the burst's
#: idle connections are closed at the next heartbeat.
STEADY_CONNECTIONS = 2

#: The scripts a node runs, by their name in :mod:`wsserver.brokers.redis_scripts`.
SCRIPTS = (
    "PUBLISH", "HISTORY", "PRESENCE_ADD", "PRESENCE_REMOVE", "ROOMS", "USER_CONNECT",
    "USER_DISCONNECT", "HEARTBEAT", "LEAVE", "NODES", "RESYNC", "RESET_EPOCH",
)

_Queued = tuple[list[str], list[Any], "asyncio.Future[Any]"]


class RedisCommands:
    """The command connections of one node, and how a command fails.

    Args:
        url: the broker URL (:func:`~wsserver.brokers.redis_pool.connection_pool`).
        safe_url: ``url`` without its password, for logs.
        client_name: ``CLIENT SETNAME`` of every connection.
        timeout: bound on waiting for a free connection, on connecting and on
            each answer.
        max_connections: bound on the pool.
        retry_after: what :class:`BrokerUnavailable` suggests to clients.
        is_up: False while the broker is known down (``gated`` commands then
            fail at once).
        count_error: called once per failed command.
    """

    def __init__(
        self, url: str, *, safe_url: str, client_name: str, timeout: float,
        max_connections: int, retry_after: float, is_up: Callable[[], bool],
        count_error: Callable[[], None],
    ) -> None:
        self.safe_url = safe_url
        self._retry_after = retry_after
        self._is_up = is_up
        self._count_error = count_error
        # No retries inside redis-py: a retried EVALSHA could publish twice,
        # and retries would stretch a failure well beyond command_timeout.
        # Blocking: a burst of publishes waits (bounded) for a free connection
        # instead of failing with "too many connections" while Redis is fine.
        self._pool = connection_pool(
            url,
            timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
            client_name=client_name,
            # RESP2: pub/sub messages are plain replies to the reader (RESP3
            # would route them to a push handler) and no handshake extras.
            protocol=2,
        )
        self.redis = Redis(connection_pool=self._pool)
        self._scripts: dict[str, AsyncScript] = {
            name: self.redis.register_script(getattr(lua, name)) for name in SCRIPTS
        }
        # Commands in flight now, and the most at once since the last shed_idle().
        self._active = 0
        self._peak = 0
        # Publishes waiting for the batch in flight (see submit_publish).
        self._publishes: list[_Queued] = []
        self._publishing = False
        self._sender: asyncio.Task[None] | None = None

    def make_connection(self) -> AbstractConnection:
        """A new connection outside the pool (for the subscription), not yet connected."""
        return self._pool.make_connection()  # type: ignore[no-untyped-call,no-any-return]

    async def close(self) -> None:
        """Fail the publishes still queued and close every connection."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.wait([self._sender])
        await self.redis.aclose()
        await self._pool.aclose()

    def unavailable(self, reason: str) -> BrokerUnavailable:
        """The error of a command refused because the broker is known down."""
        self._count_error()
        return BrokerUnavailable(f"broker unavailable ({reason})", self._retry_after)

    async def call(
        self, what: str, command: Callable[[], Awaitable[T]], *, gated: bool = True
    ) -> T:
        """Run one Redis command; :class:`BrokerUnavailable` when Redis is unreachable.

        ``gated`` commands fail at once while the broker is known to be down,
        rather than each waiting out a timeout on a frozen Redis (the probe,
        heartbeats and resyncs are not gated: they find out when it is back).
        """
        if gated and not self._is_up():
            raise self.unavailable("Redis down")
        self._active += 1
        self._peak = max(self._peak, self._active)
        try:
            return await command()
        except UNAVAILABLE_ERRORS as exc:
            self._count_error()
            log.debug("broker: %s failed on %s: %s", what, self.safe_url, exc)
            raise BrokerUnavailable(
                f"broker unavailable ({type(exc).__name__})", retry_after=self._retry_after
            ) from exc
        finally:
            self._active -= 1

    async def script(
        self, name: str, keys: list[str], args: list[Any], *, gated: bool = True
    ) -> Any:
        """Run the script ``name`` (:data:`SCRIPTS`) through :meth:`call`."""
        script = self._scripts[name]
        return await self.call(name.lower(), lambda: script(keys=keys, args=args), gated=gated)

    async def script_unchecked(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run the script ``name`` with redis-py's own errors and no error count
        (leaving at shutdown, when nobody is left to tell)."""
        return await self._scripts[name](keys=keys, args=args)

    async def shed_idle(self) -> None:
        """After a burst of concurrent commands, close the pool's idle connections.

        redis-py's pool keeps every connection it ever opened; without this a
        thousand members leaving at once would leave MAX_CONNECTIONS sockets
        open on Redis for good. Called by the heartbeat loop; the next command
        reconnects one connection.
        """
        peak, self._peak = self._peak, self._active
        if peak <= STEADY_CONNECTIONS or self._active:
            return
        await self._pool.disconnect(inuse_connections=False)
        log.debug("broker: closed idle Redis connections after %d commands at once", peak)

    # --- auto-pipelined publishes -----------------------------------------------

    def submit_publish(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue one PUBLISH script call; its reply, once its batch is answered.

        Auto-pipelining: the publishes made while a batch is in flight go out
        together as the next one (one round trip, in the order made), so many
        publishers, or one session's run of publishes, share round trips, and
        the publications they fan out arrive, and are written to members,
        together. Queued synchronously, so the order of calls is the order
        Redis runs them in.
        """
        if not self._is_up():
            raise self.unavailable("Redis down")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._publishes.append((keys, args, future))
        if not self._publishing:
            self._publishing = True
            self._sender = asyncio.create_task(self._publish_batches(), name="broker-publish")
        return future

    async def _publish_batches(self) -> None:
        """Send the queued publishes, a batch per round trip, until none are left."""
        try:
            while self._publishes:
                batch, self._publishes = self._publishes, []
                try:
                    results = await self.call(
                        "publish", functools.partial(self._pipelined, batch), gated=False
                    )
                except Exception as exc:
                    _fail(batch, exc)
                    continue
                for (_, _, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue  # its publish() was cancelled
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._publishing = False
            # Cancelled (close()): nothing queued is left waiting.
            batch, self._publishes = self._publishes, []
            _fail(batch, BrokerUnavailable("broker closing", self._retry_after))

    async def _pipelined(self, batch: list[_Queued]) -> list[Any]:
        """EVALSHA for each publish, in one round trip; the script loaded if Redis lost it.

        Not through redis-py's Script in a pipeline: that asks SCRIPT EXISTS
        first, a second round trip per batch. A NOSCRIPT (Redis restarted)
        means the command did not run, so it is safe to load and send again.
        """
        script = self._scripts["PUBLISH"]
        results = await self._evalsha_all(script, batch)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            await self.redis.script_load(script.script)
            again = await self._evalsha_all(script, [batch[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _evalsha_all(self, script: AsyncScript, batch: list[_Queued]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            # Per-command errors come back in place; a lost connection raises.
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results


def _fail(batch: list[_Queued], exc: Exception) -> None:
    for _, _, future in batch:
        if not future.done():
            future.set_exception(exc)

