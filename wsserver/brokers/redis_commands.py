"""The Redis broker's command side: a bounded pool, the scripts, errors as BrokerUnavailable.

Every read-modify-write is one Lua script (:mod:`wsserver.brokers.redis_scripts`),
run with EVALSHA. Every command is auto-pipelined: the commands made while a
batch is in flight go out together as the next batch, in one pipeline and one
round trip, in the order made, and each caller gets its own answer or its own
error. A batch is bounded by the command timeout; when Redis cannot be
reached every command of the batch raises :class:`BrokerUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wsserver.brokers import redis_scripts as lua
from wsserver.brokers.base import BrokerUnavailable
from wsserver.brokers.redis_pool import connection_pool

log = logging.getLogger("wsserver.broker")

#: Errors that mean "Redis cannot be reached or cannot take writes right now".
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # includes BusyLoadingError (Redis loading its dataset)
    RedisTimeoutError,
    ReadOnlyError,  # a replica after a failover, before it is promoted
    MasterDownError,  # a replica cut off from its master (replica-serve-stale-data no)
    OSError,
    asyncio.TimeoutError,
)
#: Error replies redis-py has no class for that mean the same: a master with
#: min-replicas-to-write refusing writes while too few replicas are connected.
UNAVAILABLE_REPLIES = ("NOREPLICAS",)

#: Command connections per node at most. Batches take one at a time and the
#: probe another, so a node uses two (a thousand members leaving at once are
#: one batch, not a thousand connections); this is a guard: whatever else
#: would take one waits its turn (bounded by command_timeout) rather than pile
#: up more.
MAX_CONNECTIONS = 16

#: The scripts a node runs, by their name in :mod:`wsserver.brokers.redis_scripts`.
SCRIPTS = (
    "PUBLISH", "HISTORY", "PRESENCE_ADD", "PRESENCE_REMOVE", "ROOMS", "USER_CONNECT",
    "USER_DISCONNECT", "HEARTBEAT", "LEAVE", "NODES", "RESYNC", "RESET_EPOCH",
)



@dataclass(slots=True)
class _Queued:
    """One command waiting for its batch: its arguments and its caller's future."""

    command: tuple[Any, ...]
    future: asyncio.Future[Any]


class RedisCommands:
    """The command connections of one node, the auto-pipelining, and how a command fails.

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
        # Blocking: a command that needs a connection while all are busy (the
        # probe beside a batch) waits for one, bounded, instead of failing
        # with "too many connections" while Redis is fine.
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
        # Commands waiting for the batch in flight, and that batch (see submit).
        self._queue: list[_Queued] = []
        self._sending: list[_Queued] = []
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    def make_connection(self) -> AbstractConnection:
        """A new connection outside the pool (for the subscription), not yet connected."""
        return self._pool.make_connection()  # type: ignore[no-untyped-call,no-any-return]

    async def close(self) -> None:
        """Fail the commands still queued or in flight and close every connection."""
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.wait([self._sender])
        await self.redis.aclose()
        await self._pool.aclose()

    def unavailable(self, reason: str) -> BrokerUnavailable:
        """The error of a command refused because the broker is known down."""
        self._count_error()
        return BrokerUnavailable(f"broker unavailable ({reason})", self._retry_after)

    # --- auto-pipelined commands --------------------------------------------------

    def script(
        self, name: str, keys: list[str], args: list[Any], *, gated: bool = True
    ) -> asyncio.Future[Any]:
        """Run the script ``name`` (:data:`SCRIPTS`) in the next batch; its answer."""
        sha = self._scripts[name].sha
        return self._submit(("EVALSHA", sha, len(keys), *keys, *args), gated)

    def command(self, *command: Any, gated: bool = True) -> asyncio.Future[Any]:
        """Run a plain command (``HGETALL``, ``PUBLISH``...) in the next batch; its
        answer, parsed as redis-py parses it."""
        return self._submit(command, gated)

    def _submit(self, command: tuple[Any, ...], gated: bool) -> asyncio.Future[Any]:
        """Queue ``command``; its answer once its batch is answered.

        Auto-pipelining: the commands made while a batch is in flight go out
        together as the next one (one round trip, in the order made), so a
        burst of connects, or many publishers, or one session's run of
        publishes, shares round trips and one connection, and the
        publications fanned out arrive, and are written to members, together.
        Queued synchronously, so the order of calls is the order Redis runs
        them in (what a room's offsets and a user's counts rely on).

        ``gated`` commands fail at once while the broker is known to be down,
        rather than each waiting out a timeout on a frozen Redis (heartbeats
        and resyncs are not gated: they find out when it is back).
        """
        if gated and not self._is_up():
            raise self.unavailable("Redis down")
        if self._closed:
            raise BrokerUnavailable("broker closing", self._retry_after)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(command, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_batches(), name="broker-batches")
        return future

    async def _send_batches(self) -> None:
        """Send the queued commands, a batch per round trip, until none are left.

        One batch in flight at a time: a second pipeline on another connection
        could reach Redis before the first, and the order of calls would no
        longer be the order Redis runs them in.
        """
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                self._sending = batch
                try:
                    results = await self._round_trip(batch)
                except BrokerUnavailable as exc:
                    _fail(batch, exc, self._count_error)
                except Exception as exc:  # a bug, not Redis: every caller sees it
                    _fail(batch, exc)
                else:
                    self._answer(batch, results)
                self._sending = []
        finally:
            self._sender = None
            # Cancelled (close()): nothing in flight or queued is left waiting.
            left = [*self._sending, *self._queue]
            self._sending, self._queue = [], []
            _fail(left, BrokerUnavailable("broker closing", self._retry_after))

    def _answer(self, batch: list[_Queued], results: list[Any]) -> None:
        """Give each caller of ``batch`` its own answer or its own error."""
        for queued, result in zip(batch, results, strict=True):
            if queued.future.done():
                continue  # its caller was cancelled
            if _unavailable_reply(result):
                # In place, for this command only: READONLY (a replica), NOREPLICAS.
                self._count_error()
                queued.future.set_exception(_unavailable(result, self._retry_after))
            elif isinstance(result, Exception):
                queued.future.set_exception(result)
            else:
                queued.future.set_result(result)

    async def _round_trip(self, batch: list[_Queued]) -> list[Any]:
        """The answers of ``batch``, in order: per-command errors in place,
        :class:`BrokerUnavailable` for all when Redis cannot be reached."""
        try:
            return await self._pipelined(batch)
        except UNAVAILABLE_ERRORS as exc:
            log.debug("broker: a batch of %d commands failed on %s: %s",
                      len(batch), self.safe_url, exc)
            raise _unavailable(exc, self._retry_after) from exc

    async def _pipelined(self, batch: list[_Queued]) -> list[Any]:
        """Every command of ``batch`` in one pipeline; after a NOSCRIPT, every script
        loaded and the commands that failed sent again, in one more round trip.

        Not through redis-py's Script in a pipeline: that asks SCRIPT EXISTS
        first, a second round trip per batch. A NOSCRIPT (Redis restarted, or
        SCRIPT FLUSH) means that command did not run, so it is safe to send
        again. All the scripts are loaded at once, in MULTI/EXEC, so no client
        ever finds some of them loaded and others not: the commands that fail
        are then every script call of the batch, or those after a flush that
        came in its middle, and, sent again in order, they still run in the
        order made. Only a plain command of such a batch (a presence read, a
        disconnect notice) runs before the script calls made before it.
        """
        results = await self._execute([], batch)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            loads = [("MULTI",), *(("SCRIPT LOAD", script.script)
                                   for script in self._scripts.values()), ("EXEC",)]
            answers = await self._execute(loads, [batch[i] for i in missing])
            loaded = answers[len(loads) - 1]
            if isinstance(loaded, Exception):
                raise loaded
            for i, result in zip(missing, answers[len(loads):], strict=True):
                results[i] = result
        return results

    async def _execute(self, before: list[tuple[Any, ...]], batch: list[_Queued]) -> list[Any]:
        """One round trip: ``before`` (their answers first), then ``batch``."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in before:
                pipe.execute_command(*command)
            for queued in batch:
                pipe.execute_command(*queued.command)
            # Per-command errors come back in place; a lost connection raises.
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results


def _unavailable_reply(result: Any) -> bool:
    """Whether a command's answer is an error that means Redis cannot take it now."""
    return isinstance(result, UNAVAILABLE_ERRORS) or (
        isinstance(result, ResponseError) and str(result).startswith(UNAVAILABLE_REPLIES)
    )


def _unavailable(exc: BaseException, retry_after: float) -> BrokerUnavailable:
    unavailable = BrokerUnavailable(
        f"broker unavailable ({type(exc).__name__})", retry_after=retry_after
    )
    unavailable.__cause__ = exc
    return unavailable


def _fail(
    batch: list[_Queued], exc: Exception, count: Callable[[], None] | None = None
) -> None:
    """Fail every caller of ``batch`` still waiting (counting each with ``count``).

    Each gets its own copy of a :class:`BrokerUnavailable`: one exception
    raised in many tasks would collect all their tracebacks.
    """
    for queued in batch:
        if queued.future.done():
            continue
        if count is not None:
            count()
        if isinstance(exc, BrokerUnavailable):
            own = BrokerUnavailable(exc.message, exc.retry_after)
            own.__cause__ = exc.__cause__
            queued.future.set_exception(own)
        else:
            queued.future.set_exception(exc)
