"""The Redis broker's subscription: one pub/sub connection, its reconnects and the probe.

One connection per node, subscribed to the channel of each room with local
members (never a pattern: a node receives only its rooms), to the control
channel (disconnects, presence lost with a dead node), to this node's
probe channel and to this process's forward channel (client messages of its
HTTP streams that reached another node). One reader task hands every message over in arrival order,
which is each room's offset order because Redis runs the scripts serially.

Readiness: every ``probe_interval`` the node publishes on its probe channel
and must read it back on its subscription within the probe timeout, so a
Redis that accepts connections but answers nothing (``SIGSTOP``) counts as
down. A failed probe also drops the subscription: it may be dead without the
socket knowing. The subscriber reconnects with backoff, re-subscribes every
room and reports it (the hub then repairs gaps from history).

The pub/sub read itself has no timeout (an idle subscription is healthy; the
probe watches it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Callable, Sequence

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from wsserver.brokers.base import BrokerUnavailable
from wsserver.brokers.redis_commands import UNAVAILABLE_ERRORS, RedisCommands
from wsserver.brokers.redis_keys import KeySpace
from wsserver.metrics import Metrics

log = logging.getLogger("wsserver.broker")

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


class RedisSubscription:
    """This node's pub/sub connection, kept subscribed, and whether Redis answers on it.

    Args:
        keys: the node's channel names.
        commands: where the connection comes from and the probe is published.
        on_room_message: a room's raw envelope, in arrival order.
        on_control: a control channel message.
        forward_channel: this process's forward channel.
        on_forwarded: a message on it.
        on_resubscribed: the connection was lost and is back, with these rooms.
        metrics: ``wsserver_broker_up`` follows :attr:`up`.
        count_error: called once per failure (connect, probe, subscribe).
        command_timeout, probe_interval, probe_timeout: as the broker's.
    """

    def __init__(
        self, keys: KeySpace, commands: RedisCommands, *,
        on_room_message: Callable[[str, bytes], None],
        on_control: Callable[[bytes], None],
        forward_channel: bytes,
        on_forwarded: Callable[[bytes], None],
        on_resubscribed: Callable[[Sequence[str]], None],
        metrics: Metrics | None, count_error: Callable[[], None],
        command_timeout: float, probe_interval: float, probe_timeout: float,
    ) -> None:
        self._keys = keys
        self._commands = commands
        self._on_room_message = on_room_message
        self._on_control = on_control
        self._forward_channel = forward_channel
        self._on_forwarded = on_forwarded
        self._on_resubscribed = on_resubscribed
        self._metrics = metrics
        self._count_error = count_error
        self.command_timeout = command_timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.closing = False
        # _rooms is what should be subscribed; _channels maps each subscribed
        # channel back to its room for the reader.
        self._rooms: set[str] = set()
        self._channels: dict[bytes, str] = {}
        self._control = keys.control
        self._probe_channel = keys.probe
        self._sub_conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sub_ready = False
        self._confirmations: dict[bytes, list[asyncio.Future[None]]] = {}
        self._probe_ok = False
        self._probe_seq = 0
        self._probe_waiter: tuple[bytes, asyncio.Future[None]] | None = None
        self._probe_now = asyncio.Event()
        self._reported_up: bool | None = None
        self._subscribed_once = asyncio.Event()
        self._probed_once = asyncio.Event()

    @property
    def up(self) -> bool:
        """Subscribed, and the last probe came back in time."""
        return self._sub_ready and self._probe_ok

    async def first_probe(self, timeout: float) -> None:
        """Until the first probe ended (either way), at most ``timeout`` s."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._probed_once.wait(), timeout)

    def drop(self) -> None:
        """End the pub/sub connection; the subscriber reconnects (probe failed)."""
        if self._reader is not None:
            self._reader.cancel()

    # --- rooms ----------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        """Subscribe to ``room``'s channel; returns once Redis confirmed it.

        The confirmation matters: a history read sent after it is answered
        after the subscription took effect, so nothing falls between them.
        """
        channel = self._keys.room_channel(room)
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
        """Stop receiving ``room``; what is still in flight for it is dropped."""
        self._rooms.discard(room)
        channel = self._keys.room_channel(room)
        # Messages still in flight for the room are dropped by the reader.
        self._channels.pop(channel, None)
        conn = self._sub_conn
        if conn is not None and self._sub_ready:
            # Not confirmed: a lost UNSUBSCRIBE only costs a few dropped
            # messages until the next reconnect, which subscribes _rooms only.
            with contextlib.suppress(*UNAVAILABLE_ERRORS):
                await conn.send_command("UNSUBSCRIBE", channel, check_health=False)

    # --- the connection -------------------------------------------------------

    async def run(self) -> None:
        """Keep the pub/sub connection subscribed, reconnecting with backoff."""
        delay = BACKOFF_FIRST
        connected_before = False
        while not self.closing:
            conn = self._commands.make_connection()
            reader: asyncio.Task[None] | None = None
            try:
                try:
                    await asyncio.wait_for(
                        conn.connect(), self.command_timeout * 2  # type: ignore[no-untyped-call]
                    )
                    self._sub_conn = conn
                    reader = self._reader = asyncio.create_task(
                        self._read(conn), name="broker-reader"
                    )
                    self._channels = {
                        self._keys.room_channel(room): room for room in self._rooms
                    }
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
                    log.info("broker: re-subscribed %d rooms on %s", len(rooms),
                             self._commands.safe_url)
                    self._on_resubscribed(rooms)
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
        """Read the subscription until it fails; hand each message over."""
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
        room = self._channels.get(channel)
        if room is not None:
            self._on_room_message(room, data)
        elif channel == self._probe_channel:
            waiter = self._probe_waiter
            if waiter is not None and waiter[0] == data and not waiter[1].done():
                waiter[1].set_result(None)
        elif channel == self._forward_channel:
            self._on_forwarded(data)
        elif channel == self._control:
            self._on_control(data)

    # --- readiness ------------------------------------------------------------

    async def probe_loop(self) -> None:
        """Probe every ``probe_interval`` (at once after each new subscription)."""
        loop = asyncio.get_running_loop()
        await self._subscribed_once.wait()
        while not self.closing:
            started = loop.time()
            ok = await self._probe_once()
            self._probed_once.set()
            if not ok and self._sub_ready:
                # Subscribed yet deaf: the connection may be dead without the
                # socket knowing (or Redis is frozen). Start over.
                self.drop()
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
                await self._commands.redis.publish(self._probe_channel, token)
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
        safe_url = self._commands.safe_url
        if up:
            log.info("broker: Redis at %s is up (node %s)", safe_url, self._keys.node)
        elif self._reported_up is None and exc is None and not self._subscribed_once.is_set():
            return  # not tried yet
        else:
            reason = "probe not answered in time" if exc is None else (
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            )
            log.warning(
                "broker: Redis at %s is down (%s); publish, joins and the API answer "
                "'unavailable' until it is back; retrying", safe_url, reason,
            )
        self._reported_up = up
