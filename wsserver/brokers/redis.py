"""RedisBroker: rooms, history, presence and limits shared by every node through Redis.

The broker is a thin composition of single-purpose parts, each in its module:

- :mod:`~wsserver.brokers.redis_commands`: the command connections (a small
  bounded pool), the Lua scripts (every read-modify-write is one, so a
  publish is one round trip that also assigns the room's offset and appends
  to its stream), auto-pipelining, and how a command fails
  (:class:`BrokerUnavailable`, bounded by ``command_timeout``);
- :mod:`~wsserver.brokers.redis_subscription`: the one pub/sub connection,
  its reconnects, and the readiness probe behind :attr:`RedisBroker.up`;
- :mod:`~wsserver.brokers.redis_presence`: presence, user counts, this
  node's account of its entries and their resync, heartbeats and reaping;
- :mod:`~wsserver.brokers.redis_codec` and :mod:`~wsserver.brokers.redis_keys`:
  the wire format and the key names, pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from wsserver.brokers.base import (
    Broker,
    BrokerSink,
    BrokerUnavailable,
    HistoryPage,
    HistorySpec,
    NodeInfo,
    NodeStats,
    Presence,
    PublishResult,
    RoomCount,
)
from wsserver.brokers.redis_codec import (
    decode_envelope,
    disconnect_message,
    encode_origin,
    epoch_answer,
    history_args,
    history_page,
    ms,
    publish_args,
    publish_result,
    reset_epoch_args,
)
from wsserver.brokers.redis_commands import (
    MAX_CONNECTIONS,
    UNAVAILABLE_ERRORS,
    RedisCommands,
)
from wsserver.brokers.redis_keys import KeySpace
from wsserver.brokers.redis_presence import RedisPresence
from wsserver.brokers.redis_subscription import BACKOFF_FIRST, BACKOFF_MAX, RedisSubscription
from wsserver.brokers.redis_urls import redact_url
from wsserver.metrics import Metrics

__all__ = [
    "BACKOFF_FIRST", "BACKOFF_MAX", "MAX_CONNECTIONS",
    "UNAVAILABLE_ERRORS", "RedisBroker", "decode_envelope", "encode_origin", "redact_url",
]

log = logging.getLogger("wsserver.broker")


class RedisBroker(Broker):
    """The broker shared by every node through one Redis (``--broker redis://...``).

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://...``, ``unix:///path``
            or ``redis+sentinel://[:password@]host:port,.../MASTER/db``
            (:mod:`wsserver.brokers.redis_urls`).
        node_name: this node's unique name (``/api/nodes``, presence entries).
        metrics: updated with ``wsserver_broker_*`` when given.
        probe_interval: seconds between readiness probes.
        probe_timeout: seconds a probe may take (default: the smaller of
            ``command_timeout`` and ¾ of ``probe_interval``), so that a dead
            Redis shows within two intervals.
        command_timeout: bound on connecting and on each command's answer.
        heartbeat_interval: seconds between this node's heartbeats.
        node_ttl: a node whose heartbeat is this late is dead: its presence
            and user counts are removed by the next heartbeat of a node whose
            own heartbeats reached Redis regularly for at least this long
            (so a Redis outage for everyone reaps nobody). At least twice
            ``heartbeat_interval``.
        prefix: of every key and channel, to share one Redis between clusters.
        max_connections: bound on the command connections.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        node_name: str,
        *,
        metrics: Metrics | None = None,
        probe_interval: float = 2.0,
        probe_timeout: float | None = None,
        command_timeout: float = 1.0,
        heartbeat_interval: float = 5.0,
        node_ttl: float = 15.0,
        prefix: str = "wsserver",
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__(node_name)
        if "\0" in node_name or not node_name:
            raise ValueError("node name must be non-empty, without NUL")
        if node_ttl < 2 * heartbeat_interval:
            # A node reaps others only while its own heartbeats come at most
            # node_ttl - heartbeat_interval apart (see the HEARTBEAT script).
            raise ValueError("node_ttl must be at least twice heartbeat_interval")
        self.url = url
        self.safe_url = redact_url(url)
        self._metrics = metrics
        self.probe_interval = probe_interval
        self.probe_timeout = (
            probe_timeout if probe_timeout is not None
            else min(command_timeout, 0.75 * probe_interval)
        )
        self.command_timeout = command_timeout
        self.heartbeat_interval = heartbeat_interval
        self.node_ttl = node_ttl
        self._keys = KeySpace(prefix, node_name)
        self._sink: BrokerSink | None = None
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._commands = RedisCommands(
            url, safe_url=self.safe_url, client_name=f"wsserver:{node_name}",
            timeout=command_timeout, max_connections=max_connections,
            retry_after=probe_interval, is_up=lambda: self.up,
            count_error=self._count_error,
        )
        self._subscription = RedisSubscription(
            self._keys, self._commands,
            on_room_message=self._deliver, on_control=self._control,
            forward_channel=self._keys.forward(self.node_tag), on_forwarded=self._hand_over,
            on_resubscribed=self._resubscribed, metrics=metrics,
            count_error=self._count_error, command_timeout=command_timeout,
            probe_interval=probe_interval, probe_timeout=self.probe_timeout,
        )
        self._presence = RedisPresence(
            self._keys, self._commands, node_stats=self._node_stats,
            heartbeat_interval=heartbeat_interval, node_ttl=node_ttl,
        )

    # --- lifecycle ------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._subscription.up

    async def start(self, sink: BrokerSink) -> None:
        """Connect and start the subscriber, heartbeats and probe.

        Never fails for want of Redis: when Redis is unreachable the broker
        starts down (``up`` False, logged) and keeps reconnecting. Returns
        after the first connection attempt.
        """
        self._sink = sink
        self._tasks = [
            asyncio.create_task(self._subscription.run(), name="broker-subscriber"),
            asyncio.create_task(self._presence.heartbeats(), name="broker-heartbeat"),
            asyncio.create_task(self._subscription.probe_loop(), name="broker-probe"),
        ]
        await self._subscription.first_probe(2 * self.command_timeout + self.probe_timeout + 1)
        if self.up:
            # Registered before the first join; otherwise the heartbeats will.
            with contextlib.suppress(BrokerUnavailable):
                await self.heartbeat()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = self._subscription.closing = self._presence.closing = True
        # Cancel until they are gone: redis-py can turn a cancellation that
        # races its own timeout into a TimeoutError, which a loop survives.
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        self._tasks = []
        self._subscription.drop()
        # Leave cleanly so other nodes do not wait node_ttl to see us go.
        await self._presence.leave()
        await self._commands.close()
        self._sink = None
        if self._metrics is not None:
            self._metrics.broker_up.set(0)

    @property
    def _registered(self) -> bool:
        """Whether this node registered (the broker tests clear it to leave no trace
        at close, as a SIGKILL would)."""
        return self._presence.registered

    @_registered.setter
    def _registered(self, registered: bool) -> None:
        self._presence.registered = registered

    def _count_error(self) -> None:
        if self._metrics is not None:
            self._metrics.broker_errors.inc()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task that close() cancels too."""
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks and not self._closing:
            self._tasks.remove(task)

    def _node_stats(self) -> NodeStats | None:
        return self._sink.node_stats() if self._sink is not None else None

    # --- what the subscription hands over -------------------------------------

    def _deliver(self, room: str, envelope: bytes) -> None:
        sink = self._sink
        if sink is not None:
            try:
                sink.on_publication(decode_envelope(room, envelope))
            except Exception:
                log.exception("broker: delivering a publication in %r failed", room)

    def _control(self, data: bytes) -> None:
        sink = self._sink
        if sink is None:
            return
        try:
            message = json.loads(data)
            if message["t"] == "disconnect":
                if message["n"] != self.node_name:
                    sink.on_disconnect(message["u"], int(message["c"]), message["r"])
            elif message["t"] == "lost":
                for room, user in message["p"]:
                    sink.on_presence_lost(room, user)
        except Exception:
            log.exception("broker: bad control message %r", data[:200])

    def _hand_over(self, data: bytes) -> None:
        session, _, text = data.partition(b"\n")
        handler = self._forwarded
        if handler is not None:
            try:
                handler(session.decode(), text.decode())
            except Exception:
                log.exception("broker: handing over a forwarded message failed")

    def _resubscribed(self, rooms: Sequence[str]) -> None:
        if self._sink is not None:
            try:
                self._sink.on_resubscribed(rooms)
            except Exception:
                log.exception("broker: on_resubscribed failed")
        # Commands that timed out in the outage may have run or not.
        self._spawn(self._presence.resync_quietly("after an outage"))

    # --- publications ---------------------------------------------------------

    async def publish(
        self,
        room: str,
        message: bytes,
        *,
        history: HistorySpec | None = None,
        origin: str | None = None,
        idempotency_key: str | None = None,
    ) -> PublishResult:
        keys = self._keys.publish(room, idempotency_key)
        args = publish_args(
            self._keys.room_channel(room), message, history, origin, idempotency_key is not None
        )
        started = time.perf_counter()
        answer: bytes = await self._commands.script("PUBLISH", keys, args)
        if self._metrics is not None:
            self._metrics.broker_publish.observe(time.perf_counter() - started)
        return publish_result(answer)

    async def subscribe(self, room: str) -> None:
        """Subscribe to ``room``'s channel; returns once Redis confirmed it.

        The confirmation matters: a history read sent after it is answered
        after the subscription took effect, so nothing falls between them.
        """
        await self._subscription.subscribe(room)

    async def unsubscribe(self, room: str) -> None:
        await self._subscription.unsubscribe(room)

    async def history(
        self, room: str, history: HistorySpec, *, since: int | None = None,
        limit: int | None = None,
    ) -> HistoryPage:
        answer = await self._commands.script(
            "HISTORY", self._keys.stream(room), history_args(history, since, limit)
        )
        return history_page(room, answer, since, limit)

    async def reset_epoch(self, room: str, history: HistorySpec, stale: str) -> str:
        answer = await self._commands.script(
            "RESET_EPOCH", self._keys.stream(room), reset_epoch_args(stale, history)
        )
        return epoch_answer(answer)

    # --- presence -------------------------------------------------------------

    async def presence_add(self, room: str, user: str) -> bool:
        return await self._presence.presence_add(room, user)

    async def presence_remove(self, room: str, user: str) -> bool:
        return await self._presence.presence_remove(room, user)

    async def presence(self, room: str) -> Presence:
        return await self._presence.presence(room)

    async def rooms(self) -> dict[str, RoomCount]:
        return await self._presence.rooms()

    # --- users and nodes ------------------------------------------------------

    async def user_connect(self, user: str, limit: int) -> int | None:
        return await self._presence.user_connect(user, limit)

    async def user_disconnect(self, user: str) -> None:
        await self._presence.user_disconnect(user)

    async def user_connections(self, users: Sequence[str]) -> dict[str, int]:
        return await self._presence.user_connections(users)

    async def disconnect_user(self, user: str, code: int, reason: str) -> None:
        message = disconnect_message(self.node_name, user, code, reason)
        await self._commands.command("PUBLISH", self._keys.control, message)
        # This node's own copy is skipped by the reader: close locally now,
        # as MemoryBroker does, so the caller's answer follows the close.
        if self._sink is not None:
            self._sink.on_disconnect(user, code, reason)

    async def nodes(self) -> list[NodeInfo]:
        return await self._presence.nodes()

    # --- HTTP streaming -------------------------------------------------------

    async def ticket_put(self, ticket: str, token: str, ttl: float) -> None:
        await self._commands.command("SET", self._keys.ticket(ticket), token, "PX", ms(ttl))

    async def ticket_take(self, ticket: str) -> str | None:
        # GETDEL (Redis 6.2+): read and remove in one step, so a ticket
        # presented twice at once is taken once.
        token: bytes | None = await self._commands.command("GETDEL", self._keys.ticket(ticket))
        return None if token is None else token.decode()

    async def forward(self, node_tag: str, session: str, text: str) -> bool:
        data = session.encode() + b"\n" + text.encode()
        # Batched like every command, so forwarded messages go in the order of the calls.
        receivers = await self._commands.command("PUBLISH", self._keys.forward(node_tag), data)
        return int(receivers) > 0

    # --- this node's registration ------------------------------------------------

    async def heartbeat(self) -> list[str]:
        """Register this node now and reap overdue nodes; the names reaped."""
        return await self._presence.heartbeat()

    async def resync(self, *, fresh: bool = False) -> None:
        """Replace this node's presence and user entries in Redis with its own account."""
        await self._presence.resync(fresh=fresh)

