"""RedisBroker: rooms, history, presence and limits shared by every node through Redis.

Two kinds of connection per node:

- a small pool for commands; every read-modify-write is one Lua script
  (:mod:`wsserver.brokers.redis_scripts`), so a publish is one round trip
  that also assigns the room's offset and appends to its stream;
- one pub/sub connection, subscribed to the channel of each room with local
  members (never a pattern: a node receives only its rooms), to the control
  channel (disconnects, presence lost with a dead node) and to this node's
  probe channel. One reader task delivers to the sink in arrival order,
  which is each room's offset order because Redis runs the scripts serially.

Readiness: every ``probe_interval`` the node publishes on its probe channel
and must read it back on its subscription within the probe timeout, so a
Redis that accepts connections but answers nothing (``SIGSTOP``) counts as
down. A failed probe also drops the subscription: it may be dead without the
socket knowing. The subscriber reconnects with backoff, re-subscribes every
room and calls :meth:`BrokerSink.on_resubscribed` so the hub repairs gaps
from history.

Every command is bounded by ``command_timeout`` and raises
:class:`BrokerUnavailable` when Redis cannot be reached. The pub/sub read
itself has no timeout (an idle subscription is healthy; the probe watches it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
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
from wsserver.brokers.base import (
    IDEMPOTENCY_TTL,
    Broker,
    BrokerSink,
    BrokerUnavailable,
    HistoryPage,
    HistorySpec,
    NodeInfo,
    NodeStats,
    Presence,
    Publication,
    PublishResult,
    RoomCount,
)
from wsserver.brokers.memory import new_epoch
from wsserver.brokers.redis_pool import connection_pool
from wsserver.brokers.redis_urls import redact_url
from wsserver.metrics import Metrics

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

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
#: Command connections per node at most: a burst (a thousand members leaving at
#: once) waits its turn for one (bounded by command_timeout), never piles up more.
MAX_CONNECTIONS = 16
#: Concurrent commands a node needs in steady state; past that, the burst's
#: idle connections are closed at the next heartbeat.
STEADY_CONNECTIONS = 2


def encode_origin(origin: str | None) -> bytes:
    """The origin part of a pub/sub envelope: ``-`` or its byte length, a space, itself."""
    if origin is None:
        return b"- "
    raw = origin.encode()
    return b"%d %s" % (len(raw), raw)


def decode_envelope(room: str, data: bytes) -> Publication:
    """A publication from its pub/sub envelope.

    The envelope is ``OFFSET SP EPOCH SP ORIGIN-LENGTH SP ORIGIN PAYLOAD``,
    offset and epoch empty without history, origin length ``-`` for none
    (written by the publish script and :func:`encode_origin`).
    """
    offset, epoch, length, rest = data.split(b" ", 3)
    origin: str | None = None
    if length != b"-":
        size = int(length)
        origin = rest[:size].decode()
        rest = rest[size:]
    return Publication(
        room, rest, int(offset) if offset else None, epoch.decode() if epoch else None, origin
    )


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
        self._p = prefix
        # No retries inside redis-py: a retried EVALSHA could publish twice,
        # and retries would stretch a failure well beyond command_timeout.
        # Blocking: a burst of publishes waits (bounded) for a free connection
        # instead of failing with "too many connections" while Redis is fine.
        self._pool = connection_pool(
            url,
            timeout=command_timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
            client_name=f"wsserver:{node_name}",
            # RESP2: pub/sub messages are plain replies to the reader (RESP3
            # would route them to a push handler) and no handshake extras.
            protocol=2,
        )
        self._redis = Redis(connection_pool=self._pool)
        self._scripts: dict[str, AsyncScript] = {
            name: self._redis.register_script(getattr(lua, name))
            for name in (
                "PUBLISH", "HISTORY", "PRESENCE_ADD", "PRESENCE_REMOVE", "ROOMS",
                "USER_CONNECT", "USER_DISCONNECT", "HEARTBEAT", "LEAVE", "NODES", "RESYNC",
                "RESET_EPOCH",
            )
        }
        self._sink: BrokerSink | None = None
        self._closing = False
        # Commands in flight now, and the most at once since the last shed_idle().
        self._active = 0
        self._peak = 0
        # Publishes waiting for the batch in flight (see _submit_publish).
        self._publishes: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._publishing = False
        self._tasks: list[asyncio.Task[None]] = []
        # Pub/sub state. _rooms is what should be subscribed; _channels maps
        # each subscribed channel back to its room for the reader.
        self._rooms: set[str] = set()
        self._channels: dict[bytes, str] = {}
        self._control = f"{prefix}:control".encode()
        self._probe_channel = f"{prefix}:probe:{node_name}".encode()
        # Client messages of this node's HTTP streams sent to another node.
        self._forward_channel = f"{prefix}:fwd:{self.node_tag}".encode()
        self._sub_conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sub_ready = False
        self._confirmations: dict[bytes, list[asyncio.Future[None]]] = {}
        self._probe_ok = False
        self._probe_seq = 0
        self._probe_waiter: tuple[bytes, asyncio.Future[None]] | None = None
        self._probe_now = asyncio.Event()
        self._reported_up: bool | None = None
        self._registered = False
        # This node's own account of its presence and user entries, to put
        # them back when Redis lost them (restart without persistence) or an
        # outage left a command in doubt. _gate holds new presence and user
        # commands while a resync replaces the node's entries.
        self._my_presence: Counter[tuple[str, str]] = Counter()
        self._my_users: Counter[str] = Counter()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._gate: asyncio.Event | None = None
        self._dirty = False
        self._subscribed_once = asyncio.Event()
        self._probed_once = asyncio.Event()

    # --- keys -----------------------------------------------------------------

    def _room_channel(self, room: str) -> bytes:
        return f"{self._p}:room:{room}".encode()

    def _room_keys(self, room: str) -> list[str]:
        p = self._p
        return [f"{p}:pr:{room}", f"{p}:pu:{room}", f"{p}:rooms", f"{p}:nr:{self.node_name}"]

    # --- lifecycle ------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._sub_ready and self._probe_ok

    async def start(self, sink: BrokerSink) -> None:
        """Connect and start the subscriber, heartbeats and probe.

        Never fails for want of Redis: when Redis is unreachable the broker
        starts down (``up`` False, logged) and keeps reconnecting. Returns
        after the first connection attempt.
        """
        self._sink = sink
        self._tasks = [
            asyncio.create_task(self._subscriber(), name="broker-subscriber"),
            asyncio.create_task(self._heartbeats(), name="broker-heartbeat"),
            asyncio.create_task(self._prober(), name="broker-probe"),
        ]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                self._probed_once.wait(), 2 * self.command_timeout + self.probe_timeout + 1
            )
        if self.up:
            # Registered before the first join; otherwise the heartbeats will.
            with contextlib.suppress(BrokerUnavailable):
                await self.heartbeat()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        # Cancel until they are gone: redis-py can turn a cancellation that
        # races its own timeout into a TimeoutError, which a loop survives.
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        self._tasks = []
        self._drop_subscription()
        if self._registered:
            # Leave cleanly so other nodes do not wait node_ttl to see us go.
            with contextlib.suppress(*UNAVAILABLE_ERRORS):
                await self._scripts["LEAVE"](args=[self._p, self.node_name])
        await self._redis.aclose()
        await self._pool.aclose()
        self._sink = None
        if self._metrics is not None:
            self._metrics.broker_up.set(0)

    # --- commands -------------------------------------------------------------

    async def _call(
        self, what: str, command: Callable[[], Awaitable[T]], *, gated: bool = True
    ) -> T:
        """Run one Redis command; :class:`BrokerUnavailable` when Redis is unreachable.

        ``gated`` commands fail at once while the broker is known to be down,
        rather than each waiting out a timeout on a frozen Redis (the probe,
        heartbeats and resyncs are not gated: they find out when it is back).
        """
        if gated and not self.up:
            self._count_error()
            raise BrokerUnavailable("broker unavailable (Redis down)", self.probe_interval)
        self._active += 1
        self._peak = max(self._peak, self._active)
        try:
            return await command()
        except UNAVAILABLE_ERRORS as exc:
            self._count_error()
            log.debug("broker: %s failed on %s: %s", what, self.safe_url, exc)
            raise BrokerUnavailable(
                f"broker unavailable ({type(exc).__name__})", retry_after=self.probe_interval
            ) from exc
        finally:
            self._active -= 1

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

    async def _script(
        self, name: str, keys: list[str], args: list[Any], *, gated: bool = True
    ) -> Any:
        script = self._scripts[name]
        return await self._call(name.lower(), lambda: script(keys=keys, args=args), gated=gated)

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
        p = self._p
        keep = history is not None and history.size > 0
        idem = "" if idempotency_key is None else (
            f"{p}:idem:{len(room)}:{room}:{idempotency_key}"
        )
        keys = [f"{p}:meta:{room}", f"{p}:stream:{room}", idem]
        args: list[Any] = [
            self._room_channel(room),
            message,
            encode_origin(origin),
            history.size if keep and history is not None else 0,
            _ms(history.ttl) if keep and history is not None else 0,
            new_epoch() if keep else "",
            _ms(IDEMPOTENCY_TTL),
            "1" if keep else "0",
            "0" if idempotency_key is None else "1",
            origin or "",
        ]
        started = time.perf_counter()
        result: bytes = await self._submit_publish(keys, args)
        if self._metrics is not None:
            self._metrics.broker_publish.observe(time.perf_counter() - started)
        if not result:
            return PublishResult()
        offset, epoch = result.split(b" ", 1)
        return PublishResult(int(offset), epoch.decode())

    def _submit_publish(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue one PUBLISH script call; its reply, once its batch is answered.

        Auto-pipelining: the publishes made while a batch is in flight go out
        together as the next one (one round trip, in the order made), so many
        publishers, or one session's run of publishes, share round trips, and
        the publications they fan out arrive, and are written to members,
        together. Queued synchronously, so the order of calls is the order
        Redis runs them in.
        """
        if not self.up:
            self._count_error()
            raise BrokerUnavailable("broker unavailable (Redis down)", self.probe_interval)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._publishes.append((keys, args, future))
        if not self._publishing:
            self._publishing = True
            self._spawn(self._publish_batches())
        return future

    async def _publish_batches(self) -> None:
        """Send the queued publishes, a batch per round trip, until none are left."""
        try:
            while self._publishes:
                batch, self._publishes = self._publishes, []
                try:
                    results = await self._call(
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
            _fail(batch, BrokerUnavailable("broker closing", self.probe_interval))

    async def _pipelined(
        self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        """EVALSHA for each publish, in one round trip; the script loaded if Redis lost it.

        Not through redis-py's Script in a pipeline: that asks SCRIPT EXISTS
        first, a second round trip per batch. A NOSCRIPT (Redis restarted)
        means the command did not run, so it is safe to load and send again.
        """
        script = self._scripts["PUBLISH"]
        results = await self._evalsha_all(script, batch)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            await self._redis.script_load(script.script)
            again = await self._evalsha_all(script, [batch[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _evalsha_all(
        self, script: AsyncScript, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            # Per-command errors come back in place; a lost connection raises.
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def subscribe(self, room: str) -> None:
        """Subscribe to ``room``'s channel; returns once Redis confirmed it.

        The confirmation matters: a history read sent after it is answered
        after the subscription took effect, so nothing falls between them.
        """
        channel = self._room_channel(room)
        if room in self._rooms and self._sub_ready:
            return
        if not self._sub_ready or self._sub_conn is None:
            self._count_error()
            raise BrokerUnavailable("broker unavailable (no subscription)", self.probe_interval)
        self._rooms.add(room)
        self._channels[channel] = room
        try:
            await self._subscribe_channels(self._sub_conn, [channel])
        except UNAVAILABLE_ERRORS as exc:
            self._rooms.discard(room)
            self._channels.pop(channel, None)
            self._count_error()
            raise BrokerUnavailable(
                f"broker unavailable ({type(exc).__name__})", self.probe_interval
            ) from exc

    async def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)
        channel = self._room_channel(room)
        # Messages still in flight for the room are dropped by the reader.
        self._channels.pop(channel, None)
        conn = self._sub_conn
        if conn is not None and self._sub_ready:
            # Not confirmed: a lost UNSUBSCRIBE only costs a few dropped
            # messages until the next reconnect, which subscribes _rooms only.
            with contextlib.suppress(*UNAVAILABLE_ERRORS):
                await conn.send_command("UNSUBSCRIBE", channel, check_health=False)

    async def history(
        self, room: str, history: HistorySpec, *, since: int | None = None,
        limit: int | None = None,
    ) -> HistoryPage:
        p = self._p
        # Stream IDs are unsigned 64-bit: a since past any offset ever given reads nothing.
        first = "" if since is None else (
            "-" if since < 0 else f"{min(since + 1, 2**64 - 1)}-0")
        count = "" if limit is None or since is None else str(limit + 1)
        answer = await self._script(
            "HISTORY",
            [f"{p}:meta:{room}", f"{p}:stream:{room}"],
            [_ms(history.ttl), new_epoch(), first, count],
        )
        epoch, top = answer[0].decode(), int(answer[1])
        if since is None:
            return HistoryPage(epoch, top)
        kept = []
        for entry_id, flat in answer[2]:
            offset = int(entry_id.split(b"-", 1)[0])
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            origin = fields.get(b"o")
            kept.append(Publication(
                room, fields[b"d"], offset, epoch, None if origin is None else origin.decode()
            ))
        # Complete when nothing between since and the first kept one is gone.
        complete = since >= top or (bool(kept) and kept[0].offset == since + 1)
        if limit is not None and len(kept) > limit:
            kept = kept[:limit]
            complete = False
        return HistoryPage(epoch, top, kept, complete and since <= top)

    async def reset_epoch(self, room: str, history: HistorySpec, stale: str) -> str:
        p = self._p
        answer = await self._script(
            "RESET_EPOCH", [f"{p}:meta:{room}", f"{p}:stream:{room}"],
            [stale, new_epoch(), _ms(history.ttl)],
        )
        return str(answer.decode() if isinstance(answer, bytes) else answer)

    # --- presence -------------------------------------------------------------

    async def presence_add(self, room: str, user: str) -> bool:
        async with self._counted():
            count = await self._script(
                "PRESENCE_ADD", self._room_keys(room), [self.node_name, user, room]
            )
            self._my_presence[(room, user)] += 1
        return int(count) == 1

    async def presence_remove(self, room: str, user: str) -> bool:
        async with self._counted():
            # Gone whether or not Redis hears of it now: a resync tells it later.
            _decrement(self._my_presence, (room, user))
            last = await self._script(
                "PRESENCE_REMOVE", self._room_keys(room), [self.node_name, user, room]
            )
        return int(last) == 1

    async def presence(self, room: str) -> Presence:
        key = f"{self._p}:pu:{room}"
        counts: dict[bytes, bytes] = await self._call(
            "presence", lambda: self._redis.hgetall(key)  # type: ignore[arg-type,return-value]
        )
        users = sorted(user.decode() for user in counts)
        return Presence(users, sum(int(n) for n in counts.values()))

    async def rooms(self) -> dict[str, RoomCount]:
        flat = await self._script("ROOMS", [f"{self._p}:rooms"], [self._p])
        return {
            flat[i].decode(): RoomCount(int(flat[i + 1]), int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        }

    # --- users and nodes ------------------------------------------------------

    def _user_keys(self) -> list[str]:
        return [f"{self._p}:ut", f"{self._p}:un:{self.node_name}"]

    async def user_connect(self, user: str, limit: int) -> int | None:
        async with self._counted():
            try:
                count = int(await self._script("USER_CONNECT", self._user_keys(), [user, limit]))
            except BrokerUnavailable:
                # The caller admits it on this node's count: in this node's
                # account it goes, and the resync once Redis is back (_counted
                # marks the node dirty) counts it on every node.
                self._my_users[user] += 1
                raise
            if count >= 0:
                self._my_users[user] += 1
        return None if count < 0 else count

    async def user_disconnect(self, user: str) -> None:
        async with self._counted():
            _decrement(self._my_users, user)
            await self._script("USER_DISCONNECT", self._user_keys(), [user])

    async def user_connections(self, users: Sequence[str]) -> dict[str, int]:
        if not users:
            return {}
        key = f"{self._p}:ut"
        names = list(users)
        counts: list[bytes | None] = await self._call(
            "user_connections", lambda: self._redis.hmget(key, names)  # type: ignore[arg-type,return-value]
        )
        return {user: int(n or 0) for user, n in zip(names, counts, strict=True)}

    async def disconnect_user(self, user: str, code: int, reason: str) -> None:
        message = json.dumps({"t": "disconnect", "n": self.node_name, "u": user,
                              "c": code, "r": reason})
        await self._call(
            "disconnect", lambda: self._redis.publish(self._control, message)
        )
        # This node's own copy is skipped by the reader: close locally now,
        # as MemoryBroker does, so the caller's answer follows the close.
        if self._sink is not None:
            self._sink.on_disconnect(user, code, reason)

    async def nodes(self) -> list[NodeInfo]:
        flat = await self._script("NODES", [f"{self._p}:nodes"], [self._p])
        now = int(flat[0])
        found: dict[str, NodeInfo] = {}
        for i in range(1, len(flat), 3):
            name = flat[i].decode()
            stats = json.loads(flat[i + 1])
            since_beat = max(0.0, (now - int(flat[i + 2])) / 1000)
            found[name] = NodeInfo(
                name, int(stats["connections"]), int(stats["users"]),
                float(stats["uptime"]) + since_beat,
            )
        if self._sink is not None:
            mine = self._sink.node_stats()
            found[self.node_name] = NodeInfo(
                self.node_name, mine.connections, mine.users, mine.uptime
            )
        return [found[name] for name in sorted(found)]

    # --- HTTP streaming -------------------------------------------------------

    async def ticket_put(self, ticket: str, token: str, ttl: float) -> None:
        key = f"{self._p}:ticket:{ticket}"
        await self._call("ticket_put", lambda: self._redis.set(key, token, px=_ms(ttl)))

    async def ticket_take(self, ticket: str) -> str | None:
        key = f"{self._p}:ticket:{ticket}"
        # GETDEL (Redis 6.2+): read and remove in one step, so a ticket
        # presented twice at once is taken once.
        token: bytes | None = await self._call(
            "ticket_take", lambda: self._redis.getdel(key)  # type: ignore[arg-type,return-value]
        )
        return None if token is None else token.decode()

    async def forward(self, node_tag: str, session: str, text: str) -> bool:
        channel = f"{self._p}:fwd:{node_tag}".encode()
        data = session.encode() + b"\n" + text.encode()
        receivers = await self._call("forward", lambda: self._redis.publish(channel, data))
        return int(receivers) > 0

    # --- this node's entries --------------------------------------------------

    @contextlib.asynccontextmanager
    async def _counted(self) -> AsyncIterator[None]:
        """Run a presence or user command, never during a resync."""
        while self._gate is not None:
            await self._gate.wait()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        except BrokerUnavailable:
            # It may have run, or not, or (a remove) must still be told:
            # the next heartbeat replaces this node's entries.
            self._dirty = True
            raise
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def resync(self, *, fresh: bool = False) -> None:
        """Replace this node's presence and user entries in Redis with its own account.

        Done after Redis lost them (its heartbeat was unknown) and after an
        outage (a command that timed out may or may not have run). Presence
        and user commands wait meanwhile, so the account is exact. ``fresh``
        (this process's first registration) first removes what a previous
        process of the same node name left, telling every node its users left.
        """
        if self._gate is not None:
            return
        gate = self._gate = asyncio.Event()
        try:
            await self._idle.wait()
            if fresh:
                await self._script("LEAVE", [], [self._p, self.node_name], gated=False)
            args: list[Any] = [self._p, self.node_name, len(self._my_presence)]
            for (room, user), count in self._my_presence.items():
                args += [room, user, count]
            for user, count in self._my_users.items():
                args += [user, count]
            await self._script("RESYNC", [], args, gated=False)
            self._dirty = False
        finally:
            self._gate = None
            gate.set()

    async def _resync_quietly(self, why: str) -> None:
        try:
            await self.resync()
        except BrokerUnavailable:
            return  # the next heartbeat finds the node unknown and tries again
        log.info(
            "broker: restored %d presence and %d user entries of this node (%s)",
            sum(self._my_presence.values()), sum(self._my_users.values()), why,
        )

    # --- heartbeats -----------------------------------------------------------

    async def _heartbeats(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.heartbeat()
                await self.shed_idle()
            except BrokerUnavailable:
                pass  # the probe reports Redis down; heartbeats resume with it
            except Exception:
                log.exception("broker: heartbeat failed")

    async def heartbeat(self) -> list[str]:
        """Register this node now and reap overdue nodes; the names reaped."""
        if not self._registered:
            await self.resync(fresh=True)
        elif self._dirty:
            await self._resync_quietly("after failed commands")
        stats = self._sink.node_stats() if self._sink is not None else NodeStats(0, 0, 0.0)
        body = json.dumps({"connections": stats.connections, "users": stats.users,
                           "uptime": stats.uptime, **stats.extra})
        answer = await self._script(
            "HEARTBEAT",
            [f"{self._p}:nodes", f"{self._p}:node:{self.node_name}"],
            [self._p, self.node_name, body, _ms(self.node_ttl), _ms(self.heartbeat_interval)],
            gated=False,
        )
        if self._registered and not int(answer[0]):
            log.warning(
                "broker: Redis did not know this node (%s): it lost its data, or this node "
                "missed heartbeats for %.0f s and was taken for dead; restoring its entries",
                self.node_name, self.node_ttl,
            )
            await self._resync_quietly("Redis had lost them")
        self._registered = True
        reaped = [name.decode() for name in answer[1:]]
        for name in reaped:
            log.warning("broker: node %s stopped sending heartbeats; removed its users", name)
        return reaped

    # --- subscription ---------------------------------------------------------

    async def _subscriber(self) -> None:
        """Keep the pub/sub connection subscribed, reconnecting with backoff."""
        delay = BACKOFF_FIRST
        connected_before = False
        while not self._closing:
            conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
            reader: asyncio.Task[None] | None = None
            try:
                try:
                    await asyncio.wait_for(conn.connect(), self.command_timeout * 2)
                    self._sub_conn = conn
                    reader = self._reader = asyncio.create_task(
                        self._read(conn), name="broker-reader"
                    )
                    self._channels = {self._room_channel(room): room for room in self._rooms}
                    await self._subscribe_channels(
                        conn, [self._control, self._probe_channel, self._forward_channel,
                               *self._channels]
                    )
                except UNAVAILABLE_ERRORS as exc:
                    self._count_error()
                    self._sub_lost(conn, exc)
                    self._subscribed_once.set()
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                delay = BACKOFF_FIRST
                self._sub_ready = True
                # Redis just answered on the subscription: as good as a probe
                # (one runs right away too, through the command connection).
                self._probe_ok = True
                self._report()
                self._subscribed_once.set()
                rooms = sorted(self._rooms)
                if connected_before:
                    log.info("broker: re-subscribed %d rooms on %s", len(rooms), self.safe_url)
                    if self._sink is not None:
                        try:
                            self._sink.on_resubscribed(rooms)
                        except Exception:
                            log.exception("broker: on_resubscribed failed")
                    # Commands that timed out in the outage may have run or not.
                    self._spawn(self._resync_quietly("after an outage"))
                connected_before = True
                self._probe_now.set()
                await asyncio.wait([reader])
                failure = None if reader.cancelled() else reader.exception()
                if failure is not None:
                    self._count_error()
                self._sub_lost(conn, failure)
            finally:
                if reader is not None:
                    reader.cancel()
                self._reader = None
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)

    def _sub_lost(self, conn: AbstractConnection, exc: BaseException | None) -> None:
        """Forget a pub/sub connection that failed (or was dropped on purpose)."""
        self._sub_ready = False
        self._probe_ok = False  # up again only after a probe on the next connection
        if self._sub_conn is conn:
            self._sub_conn = None
        for waiters in self._confirmations.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(RedisConnectionError("pub/sub connection lost"))
        self._confirmations.clear()
        if exc is not None:
            log.debug("broker: pub/sub connection lost: %r", exc)
        self._report(exc)

    def _drop_subscription(self) -> None:
        """End the pub/sub connection; the subscriber reconnects (probe failed)."""
        if self._reader is not None:
            self._reader.cancel()

    async def _subscribe_channels(self, conn: AbstractConnection, channels: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        waiters = []
        for channel in channels:
            waiter: asyncio.Future[None] = loop.create_future()
            self._confirmations.setdefault(channel, []).append(waiter)
            waiters.append(waiter)
        try:
            await conn.send_command("SUBSCRIBE", *channels, check_health=False)
        except BaseException:
            # Never sent: no confirmation will come for these waiters.
            for channel, waiter in zip(channels, waiters, strict=True):
                pending = self._confirmations.get(channel, [])
                if waiter in pending:
                    pending.remove(waiter)
            raise
        async with asyncio.timeout(self.command_timeout):
            await asyncio.gather(*waiters)

    async def _read(self, conn: AbstractConnection) -> None:
        """Read the subscription until it fails; deliver each message."""
        while True:
            # math.inf: no socket timeout on this read, an idle channel is fine.
            message = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            kind = message[0]
            if kind == b"message":
                self._on_message(message[1], message[2])
            elif kind == b"subscribe":
                # Redis confirms each SUBSCRIBE in order: the oldest waiter
                # owns this one, even when its subscribe() gave up meanwhile.
                waiters = self._confirmations.get(message[1])
                if waiters:
                    waiter = waiters.pop(0)
                    if not waiters:
                        del self._confirmations[message[1]]
                    if not waiter.done():
                        waiter.set_result(None)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        sink = self._sink
        room = self._channels.get(channel)
        if room is not None:
            if sink is not None:
                try:
                    sink.on_publication(decode_envelope(room, data))
                except Exception:
                    log.exception("broker: delivering a publication in %r failed", room)
        elif channel == self._probe_channel:
            waiter = self._probe_waiter
            if waiter is not None and waiter[0] == data and not waiter[1].done():
                waiter[1].set_result(None)
        elif channel == self._forward_channel:
            session, _, text = data.partition(b"\n")
            handler = self._forwarded
            if handler is not None:
                try:
                    handler(session.decode(), text.decode())
                except Exception:
                    log.exception("broker: handing over a forwarded message failed")
        elif channel == self._control and sink is not None:
            try:
                self._on_control(sink, json.loads(data))
            except Exception:
                log.exception("broker: bad control message %r", data[:200])

    def _on_control(self, sink: BrokerSink, message: dict[str, Any]) -> None:
        if message["t"] == "disconnect":
            if message["n"] != self.node_name:
                sink.on_disconnect(message["u"], int(message["c"]), message["r"])
        elif message["t"] == "lost":
            for room, user in message["p"]:
                sink.on_presence_lost(room, user)

    # --- readiness ------------------------------------------------------------

    async def _prober(self) -> None:
        loop = asyncio.get_running_loop()
        await self._subscribed_once.wait()
        while not self._closing:
            started = loop.time()
            ok = await self._probe_once()
            self._probed_once.set()
            if not ok and self._sub_ready:
                # Subscribed yet deaf: the connection may be dead without the
                # socket knowing (or Redis is frozen). Start over.
                self._drop_subscription()
            self._probe_now.clear()
            wait = max(0.0, self.probe_interval - (loop.time() - started))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._probe_now.wait(), wait)

    async def _probe_once(self) -> bool:
        """Publish on this node's probe channel and read it back in time."""
        if not self._sub_ready:
            self._set_probe(False)
            return False
        self._probe_seq += 1
        token = str(self._probe_seq).encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probe_waiter = (token, waiter)
        try:
            async with asyncio.timeout(self.probe_timeout):
                await self._redis.publish(self._probe_channel, token)
                await waiter
        except UNAVAILABLE_ERRORS as exc:
            self._count_error()
            self._set_probe(False, exc)
            return False
        finally:
            self._probe_waiter = None
        self._set_probe(True)
        return True

    def _set_probe(self, ok: bool, exc: BaseException | None = None) -> None:
        self._probe_ok = ok
        self._report(exc)

    def _report(self, exc: BaseException | None = None) -> None:
        """Log and export transitions of :attr:`up`."""
        up = self.up
        if self._metrics is not None:
            self._metrics.broker_up.set(1 if up else 0)
        if up == self._reported_up:
            return
        if up:
            log.info("broker: Redis at %s is up (node %s)", self.safe_url, self.node_name)
        elif self._reported_up is None and exc is None and not self._subscribed_once.is_set():
            return  # not tried yet
        else:
            reason = "probe not answered in time" if exc is None else (
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            )
            log.warning(
                "broker: Redis at %s is down (%s); publish, joins and the API answer "
                "'unavailable' until it is back; retrying", self.safe_url, reason,
            )
        self._reported_up = up


def _fail(batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]], exc: Exception) -> None:
    for _, _, future in batch:
        if not future.done():
            future.set_exception(exc)


def _decrement(counts: Counter[T], key: T) -> None:
    if counts[key] > 1:
        counts[key] -= 1
    else:
        counts.pop(key, None)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
