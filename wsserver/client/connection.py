"""The client's I/O: one WebSocket at a time, reconnecting, over aiohttp.

Every decision is made elsewhere: what a server message means by
:class:`~wsserver.client.machine.ClientMachine`, what a close code or a refused
handshake calls for, how long to wait and when a token is spent by
:mod:`wsserver.client.decisions`. This module owns what those cannot: the
socket, the timers, the caller's futures and the rooms' queues.

Order and back-pressure:

* Callers' requests are sent in the order they were made (one FIFO lock), at
  most ``max_in_flight`` unanswered at once; past that, awaiting a request
  waits. Each also waits for an open connection, and for the user's message
  bucket (``pace``), so a fast caller is slowed rather than refused.
* After each ``welcome`` the rooms are re-joined (with ``since``) before any
  caller's request goes out.
* A room's messages and gaps go through one queue of at most ``max_queue``
  items, in the room's order; when it is full the client stops reading the
  socket, so the server sees a slow reader (it skips and later repairs, or
  says ``gap``) instead of the client's memory growing.

The transport is aiohttp's WebSocket client, as the server's own outbound
HTTP is (``wsserver/edge/httpclient.py``); docs/python-client.md has the
measurements against Tornado's client and ``websockets``. This module and
:mod:`wsserver.client.api` are the client's only I/O: the decisions stay
importable without it (``tests/unit/test_core_imports.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random as _random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Generic, TypeVar

import aiohttp
import jwt

from wsserver.client.decisions import (
    CloseDecision,
    SendPacer,
    attempt_after_close,
    close_decision,
    describe_close,
    handshake_decision,
    reconnect_delay,
    token_usable,
)
from wsserver.client.errors import (
    ClientError,
    Closed,
    ConnectionLost,
    RateLimited,
    RequestTimeout,
    RoomLost,
    ServerError,
)
from wsserver.client.machine import (
    ClientMachine,
    Delivered,
    Event,
    Joined,
    JoinRefused,
    Replied,
    RequestFailed,
    RequestKind,
    RoomLeft,
    TokenExpiring,
    Unsolicited,
    Welcomed,
)
from wsserver.client.messages import Gap, Json, Message, Position, Presence

log = logging.getLogger("wsserver.client")

T = TypeVar("T")
#: A token, or a callable (plain or async) that returns a fresh one.
TokenSource = Callable[[], str | Awaitable[str]]
MessageHandler = Callable[[Message], Awaitable[None] | None]
GapHandler = Callable[[Gap], Awaitable[None] | None]
EventHandler = Callable[[Json], Awaitable[None] | None]

#: How long a close waits for the server's close frame and the reader to end.
CLOSE_TIMEOUT = 5.0
#: The largest server message accepted (a ``joined`` reply carries up to the
#: server's ``--max-recovery-bytes``, 4 MiB by default, of recovered messages).
MAX_MESSAGE_SIZE = 64 * 1024 * 1024

Connection = aiohttp.ClientWebSocketResponse


class Client:
    """A connection to wsserver that survives network failures and server restarts.

    Use it as an async context manager: entering waits for the first
    ``welcome`` (retrying as the close codes say), leaving closes with 1000::

        async with Client("ws://127.0.0.1:8888/ws", token_refresh=get_token) as client:
            room = await client.join("chat:lobby")
            async for item in room:        # Message, or Gap when messages were lost
                ...

    Args:
        url: the ``ws://`` or ``wss://`` URL of ``/ws``, or several (the nodes
            of a cluster): each reconnect tries the next one.
        token: the JWT for the first connection (sent as ``Authorization: Bearer``).
        token_refresh: a callable, plain or async, returning a fresh token for
            the same user: called when there is no usable token, after a 4001
            close, and on ``token_expiring`` (the new token is sent in-band with
            ``refresh``, so the connection stays). Without it, a 4001 stops the client.
        request_timeout: default seconds a request waits for its reply,
            including the time it waits to be sent.
        max_in_flight: requests sent and not yet answered, at most; more wait.
        max_queue: items a room keeps for its consumer before the client stops
            reading the socket (None: no bound).
        pace: pace messages to the ``message_rate``/``message_burst`` the
            ``welcome`` announces, so a fast caller is slowed, not refused.
        ping_interval: seconds between the client's own keepalive pings (a
            server that stops answering is given up on), None for none.
        handshake_timeout: seconds a connection attempt may take.
        on_gap, on_recovery_failed: defaults for :meth:`join`'s callbacks.
        on_event: called with every server message that no request or room
            takes (``user_joined``, ``user_left``, errors without an id...).
        headers: more HTTP headers for the handshake (``Origin``...).
        random: the jitter source (tests pin it).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        token_refresh: TokenSource | None = None,
        request_timeout: float = 30.0,
        max_in_flight: int = 64,
        max_queue: int | None = 1000,
        pace: bool = True,
        ping_interval: float | None = 20.0,
        handshake_timeout: float = 10.0,
        on_gap: GapHandler | None = None,
        on_recovery_failed: GapHandler | None = None,
        on_event: EventHandler | None = None,
        headers: Mapping[str, str] | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls or not all(u.startswith(("ws://", "wss://")) for u in urls):
            raise ValueError("url must be one or more ws:// or wss:// URLs")
        if token is None and token_refresh is None:
            raise ValueError("give a token, a token_refresh callable, or both")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.urls = urls
        self.request_timeout = request_timeout
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.pace = pace
        self.ping_interval = ping_interval
        self.handshake_timeout = handshake_timeout
        self.on_gap = on_gap
        self.on_recovery_failed = on_recovery_failed
        self.on_event = on_event
        self.headers = dict(headers or {})
        self._random = random
        self._token = token
        self._token_refresh = token_refresh
        self._machine = ClientMachine()
        self._pacer = SendPacer()
        self._rooms: dict[str, Room] = {}
        self._waiters: dict[str, asyncio.Future[Json]] = {}
        self._in_flight: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        self._conn: Connection | None = None
        self._open = False
        self._changed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._first: asyncio.Future[None] | None = None
        self._stopped: Closed | None = None
        self._stopped_by_caller = False
        self._closing = False
        self._close_requested = asyncio.Event()
        self._refreshing = False
        self._url_index = 0
        #: Connections that got their ``welcome`` (1 after the first).
        self.connections = 0
        #: (close code or HTTP status or None, reason) of the last connection
        #: that ended or failed, None before any.
        self.last_close: tuple[int | None, str] | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self, timeout: float | None = None) -> None:
        """Start connecting, and return once the first ``welcome`` arrived.

        The client keeps reconnecting after that until :meth:`close` or a
        close code that says to stop.

        Raises:
            Closed: the server refused for good (4003, 403 before the upgrade,
                a 4001 with no ``token_refresh``...).
            TimeoutError: no ``welcome`` within ``timeout`` seconds.
        """
        if self._runner is None:
            self._first = asyncio.get_running_loop().create_future()
            # Retrieved here, so a failure nobody waits for any more is not logged as lost.
            self._first.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._runner = asyncio.create_task(self._run(), name="wsserver.client")
        assert self._first is not None
        await asyncio.wait_for(asyncio.shield(self._first), timeout)

    async def close(self) -> None:
        """Close with 1000 and stop: requests still waiting fail with
        :class:`Closed`, rooms' iterations end."""
        self._closing = True
        self._close_requested.set()  # cuts a reconnect delay short
        for room in self._rooms.values():
            room._finish(None)  # a reader waiting on a full room must see the close
        conn = self._conn
        if conn is not None:
            # Sends the close frame; the reader sees the server's answer and ends.
            with contextlib.suppress(asyncio.TimeoutError, aiohttp.ClientError, OSError):
                await asyncio.wait_for(conn.close(code=1000, message=b"client closed"),
                                       CLOSE_TIMEOUT)
        if self._runner is not None and not self._runner.done():
            done, _ = await asyncio.wait([self._runner], timeout=CLOSE_TIMEOUT)
            if not done:
                self._runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._runner
        self._stop(None, "closed by the client", by_caller=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_TIMEOUT)

    async def wait_closed(self) -> None:
        """Wait until the client stopped; raise :class:`Closed` when the server stopped it."""
        if self._runner is not None:
            await asyncio.wait([self._runner])
        if self._stopped is not None and not self._stopped_by_caller:
            raise self._stopped

    @property
    def state(self) -> str:
        """``open``, ``connecting`` (or waiting to reconnect), or ``stopped``."""
        if self._stopped is not None:
            return "stopped"
        return "open" if self._open else "connecting"

    @property
    def user(self) -> str | None:
        """The ``sub`` the server welcomed."""
        return self._machine.user

    @property
    def expires_at(self) -> float | None:
        """The current token's expiry, unix seconds."""
        return self._machine.expires_at

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._in_flight)

    # --- requests ---------------------------------------------------------------------

    async def request(self, message: Json, *, timeout: float | None = None,
                      kind: RequestKind = "request") -> Json:
        """Send ``message`` (an id is added) and return the reply carrying its id.

        Raises:
            ServerError: the server answered an ``error`` (a subclass per code).
            RequestTimeout: no reply within ``timeout`` (default ``request_timeout``).
            ConnectionLost: the connection dropped after it was sent.
            Closed: the client stopped.
        """
        limit = self.request_timeout if timeout is None else timeout
        msg_id: str | None = None
        try:
            async with asyncio.timeout(limit):
                msg_id, reply = await self._send(lambda: self._machine.request(message, kind))
                return await reply
        except TimeoutError:
            raise RequestTimeout(f"no reply to {message.get('type')!r} within {limit} s") from None
        finally:
            if msg_id is not None:
                self._settled(msg_id)

    async def echo(self, data: Any, *, timeout: float | None = None) -> Any:
        """The server's ``echo`` of ``data``."""
        reply = await self.request({"type": "echo", "data": data}, timeout=timeout)
        return reply.get("data")

    async def ping(self, *, timeout: float | None = None) -> None:
        """A ``ping`` answered ``pong``."""
        await self.request({"type": "ping"}, timeout=timeout)

    async def task(self, name: str, args: Json, *, timeout: float | None = None) -> Any:
        """Run a server task (``primes``, ``sha256``, or the server's own); its ``value``."""
        reply = await self.request({"type": "task", "name": name, "args": args}, timeout=timeout)
        return reply.get("value")

    async def presence(self, room: str, *, timeout: float | None = None) -> Presence:
        """Who is in ``room`` on every node (namespaces with ``presence = true``)."""
        reply = await self.request({"type": "presence", "room": room}, timeout=timeout)
        users = reply.get("users")
        connections = reply.get("connections")
        return Presence(
            room, [u for u in users if isinstance(u, str)] if isinstance(users, list) else [],
            connections if isinstance(connections, int) else 0,
        )

    async def rpc(self, method: str, data: Any = None, *, timeout: float | None = None) -> Any:
        """Call ``method`` on the application's backend through the server
        (``--proxy-rpc-url``): the ``data`` of its ``rpc_result``.

        Raises:
            UnknownType: the server has no ``--proxy-rpc-url``.
            Unavailable: the backend failed or timed out (``retry_after`` says when to retry).
            ServerError: the backend refused, with its own ``code``.
        """
        reply = await self.request({"type": "rpc", "method": method, "data": data},
                                   timeout=timeout)
        return reply.get("data")

    async def join(
        self,
        room: str,
        *,
        on_message: MessageHandler | None = None,
        since: Position | None = None,
        on_gap: GapHandler | None = None,
        on_recovery_failed: GapHandler | None = None,
        timeout: float | None = None,
    ) -> Room:
        """Join ``room`` (re-joined after every reconnect) and return it once joined.

        Args:
            room: the room's name.
            on_message: called with each :class:`Message`, in order (then the
                room is not iterated); plain or async.
            since: resume from a position kept earlier (``room.position``):
                the server sends what was missed, or the room's stream starts
                with a :class:`Gap` of kind ``recovery_failed``.
            on_gap: called with each :class:`Gap` the server reports (or the
                client detects), in order with the messages.
            on_recovery_failed: called when a re-join could not recover what
                was missed (the :class:`Gap`'s kind is ``recovery_failed``).
            timeout: seconds to wait for ``joined``.

        Raises:
            ServerError: the join was refused (``forbidden``, ``unavailable``...).
            ValueError: the client is already in ``room``.
        """
        if room in self._rooms:
            raise ValueError(f"already in {room!r}")
        handle = Room(self, room, on_message, on_gap or self.on_gap,
                      on_recovery_failed or self.on_recovery_failed, self.max_queue)
        self._rooms[room] = handle
        limit = self.request_timeout if timeout is None else timeout
        msg_id: str | None = None
        try:
            async with asyncio.timeout(limit):
                msg_id, _ = await self._send(lambda: self._machine.join(room, since),
                                             reply=False)
                await handle._joined
        except BaseException as error:
            self._rooms.pop(room, None)
            if msg_id is not None:
                self._machine.forget(room)
                self._settled(msg_id)
                if not isinstance(error, ServerError):
                    self._spawn(self._leave_quietly(room))
            handle._finish(None)
            if isinstance(error, TimeoutError):
                raise RequestTimeout(f"no answer to the join of {room!r} within {limit} s") \
                    from None
            raise
        handle._start()
        return handle

    async def _leave(self, room: Room, timeout: float | None) -> None:
        if self._rooms.get(room.name) is room:
            del self._rooms[room.name]
        room._finish(None)
        if room.name not in self._machine.rooms:
            return
        self._machine.forget(room.name)
        if self._open and self._stopped is None:
            # The server forgets our rooms when the connection drops: only tell an open one.
            with contextlib.suppress(ConnectionLost, Closed):
                await self.request({"type": "leave", "room": room.name}, timeout=timeout,
                                   kind="leave")

    async def _leave_quietly(self, room: str) -> None:
        with contextlib.suppress(ClientError):
            await self.request({"type": "leave", "room": room}, kind="leave")

    # --- sending ------------------------------------------------------------------------

    async def _send(self, build: Callable[[], Json], *,
                    reply: bool = True) -> tuple[str, asyncio.Future[Json]]:
        """Send what ``build()`` makes, in call order, within the window, on an
        open connection, paced; the id and the future of its reply (a join's
        answer goes to its room instead, ``reply=False``, as it may come on a
        later connection)."""
        async with self._send_lock:
            while True:
                while len(self._in_flight) >= self.max_in_flight:
                    await self._wait_change()
                conn = await self._wait_open()
                delay = self._pace_delay()
                if not delay:
                    break
                await asyncio.sleep(delay)
                if conn is self._conn and self._open:
                    break
                # The connection changed while pacing: start over on the new one.
            msg = build()
            msg_id = str(msg["id"])
            answer: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
            if reply:
                self._waiters[msg_id] = answer
            self._in_flight.add(msg_id)
            try:
                await self._write(conn, msg)
            except BaseException:
                self._settled(msg_id)  # cancelled while writing: nobody waits for the reply
                raise
            return msg_id, answer

    async def _send_internal(self, conn: Connection, msg: Json) -> None:
        """Send a message of the client's own (re-join, refresh), paced, ahead of the callers'."""
        delay = self._pace_delay()
        if delay:
            await asyncio.sleep(delay)
        if conn is self._conn:
            await self._write(conn, msg)

    async def _write(self, conn: Connection, msg: Json) -> None:
        """Send ``msg``; it waits only when the socket's buffer is full."""
        # On a closing connection the reader sees the close, and the request
        # fails with ConnectionLost there.
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            await conn.send_str(_encode(msg))

    def _pace_delay(self) -> float:
        return self._pacer.delay(time.monotonic()) if self.pace else 0.0

    async def _wait_open(self) -> Connection:
        while True:
            if self._stopped is not None:
                raise self._stopped
            if self._open and self._conn is not None:
                return self._conn
            await self._wait_change()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        """Wake every waiter of :meth:`_wait_change` (state, window or stop changed)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _settled(self, msg_id: str) -> None:
        """Request ``msg_id`` is answered, failed or abandoned: free its window slot."""
        self._waiters.pop(msg_id, None)
        if msg_id in self._in_flight:
            self._in_flight.discard(msg_id)
            self._notify()

    # --- the connection loop -----------------------------------------------------------

    async def _run(self) -> None:
        # One session (aiohttp's connection pool and resolver) for every connection.
        self._session = aiohttp.ClientSession()
        try:
            await self._reconnecting()
        finally:
            await self._session.close()

    async def _reconnecting(self) -> None:
        attempt = 0
        failed_code: int | None = None
        while not self._closing:
            try:
                outcome = await self._connect_once(failed_code)
            except Exception:  # a bug here must not leave every caller waiting forever
                log.exception("wsserver client: the connection loop failed")
                self._stop(None, "the client failed (see its log)")
                return
            if self._closing:
                break
            decision, code, reason, retry_after, open_for = outcome
            self.last_close = (code, reason)
            failed_code = code if open_for is None else None
            if decision.new_token:
                self._token = None
                if self._token_refresh is None:
                    decision = CloseDecision("stop")
                    reason = f"{reason} (no token_refresh to get another token)"
            if decision.action == "stop" or decision.delay is None:
                log.warning("wsserver client stopped: %s (%s)", reason, code)
                self._stop(code, reason)
                return
            attempt = attempt_after_close(attempt, open_for)
            delay = reconnect_delay(decision.delay, attempt, self._random, retry_after)
            if decision.delay == "backoff":
                attempt += 1
            self._url_index += 1
            log.info("wsserver client: %s (%s); reconnecting in %.2f s", reason, code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._close_requested.wait(), delay)

    async def _connect_once(
        self, failed_code: int | None
    ) -> tuple[CloseDecision, int | None, str, float | None, float | None]:
        """One connection, from handshake to close: (decision, code, reason,
        Retry-After, seconds it was open after its welcome or None)."""
        try:
            token = await self._usable_token()
        except Exception as error:  # the application's callable: anything may come out
            reason = f"token_refresh failed: {error!r}"
            return CloseDecision("reconnect", "backoff"), None, reason, None, None
        url = self.urls[self._url_index % len(self.urls)]
        assert self._session is not None
        try:
            async with asyncio.timeout(self.handshake_timeout):
                conn = await self._session.ws_connect(
                    url, headers={**self.headers, "Authorization": f"Bearer {token}"},
                    heartbeat=self.ping_interval, max_msg_size=MAX_MESSAGE_SIZE,
                )
        except aiohttp.WSServerHandshakeError as error:
            status = error.status if error.status >= 400 else None
            retry_after = _retry_after(error.headers)
            return handshake_decision(status), status, \
                f"handshake refused: {error.status} {error.message}", retry_after, None
        except (OSError, aiohttp.ClientError, TimeoutError) as error:
            return handshake_decision(None), None, f"cannot connect to {url}: {error!r}", None, None
        code, reason, open_for = await self._serve(conn)
        return close_decision(code, previous_code=failed_code), code, reason, None, open_for

    async def _usable_token(self) -> str:
        if self._token is not None and token_usable(_token_expiry(self._token), time.time()):
            return self._token
        if self._token_refresh is None:
            if self._token is not None:
                return self._token  # nothing better to offer; the server will say
            raise RuntimeError("no token")
        self._token = await _call(self._token_refresh)
        return self._token

    async def _serve(self, conn: Connection) -> tuple[int | None, str, float | None]:
        """Read ``conn`` until it closes; the server's close code (None when no
        close frame came: the network or the server went away), its reason,
        and the time the connection was open after its welcome."""
        self._conn = conn
        welcomed_at: float | None = None
        code: int | None = None
        reason = ""
        if self._closing:  # close() came during the handshake
            await conn.close(code=1000, message=b"client closed")
        try:
            while True:
                msg = await conn.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    for event in self._machine.receive(msg.data):
                        if isinstance(event, Welcomed):
                            welcomed_at = time.monotonic()
                        await self._handle(conn, event)
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    # Only a close frame says why. aiohttp reports a bare end of
                    # the stream (a killed server) as 1000: that is a 1006.
                    code, reason = int(msg.data), str(msg.extra or "")
                    break
                elif msg.type is not aiohttp.WSMsgType.BINARY:
                    break  # closed, or a broken frame
        finally:
            self._conn = None
            self._open = False
            with contextlib.suppress(asyncio.TimeoutError, aiohttp.ClientError, OSError):
                await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT)
            for event in self._machine.connection_lost():
                await self._handle(conn, event)
            self._in_flight.clear()
            self._notify()
        open_for = None if welcomed_at is None else time.monotonic() - welcomed_at
        return code, reason or describe_close(code), open_for

    async def _handle(self, conn: Connection, event: Event) -> None:
        if isinstance(event, Delivered):
            room = self._rooms.get(event.room)
            if room is not None:
                await room._inbox.put(event.item)
        elif isinstance(event, Replied):
            self._resolve(event.id, event.message)
        elif isinstance(event, RequestFailed):
            if isinstance(event.error, RateLimited) and event.error.retry_after is not None:
                self._pacer.penalize(event.error.retry_after, time.monotonic())
            self._fail(event.id, event.error)
        elif isinstance(event, Welcomed):
            if self.pace:
                self._configure_pacer(event.limits)
            # Registered now, while this connection is surely the live one; if it
            # drops before they are sent, connection_lost() resets them.
            self._spawn(self._resume(conn, self._machine.rejoins()))
        elif isinstance(event, Joined):
            self._on_joined(event)
        elif isinstance(event, JoinRefused):
            self._on_join_refused(conn, event)
        elif isinstance(event, RoomLeft):
            room = self._rooms.pop(event.room, None)
            log.warning("wsserver client: removed from %r by the server (%s)", event.room,
                        event.reason)
            if room is not None:
                room._finish(RoomLost(event.room, event.reason))
        elif isinstance(event, TokenExpiring):
            self._spawn(self._refresh(conn))
        elif isinstance(event, Unsolicited):
            self._on_unsolicited(event.message)

    def _configure_pacer(self, limits: Json) -> None:
        rate, burst = limits.get("message_rate"), limits.get("message_burst")
        if isinstance(rate, int | float) and isinstance(burst, int | float) and rate > 0:
            self._pacer.configure(float(rate), float(burst))

    async def _resume(self, conn: Connection, rejoins: list[Json]) -> None:
        """After ``welcome``: send the re-joins, then let the callers' requests go."""
        for msg in rejoins:
            await self._send_internal(conn, msg)
        if conn is not self._conn:
            return
        self.connections += 1
        self._open = True
        self._notify()
        log.info("wsserver client: connected as %s (connection %d, %d rooms)",
                 self._machine.user, self.connections, len(self._machine.rooms))
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    def _on_joined(self, event: Joined) -> None:
        self._settled(event.id)
        room = self._rooms.get(event.room)
        if room is not None and not room._joined.done():
            room._joined.set_result(event.reply)
        if event.recovered is not None:
            log.info("wsserver client: re-joined %r, recovered=%s, %d missed messages "
                     "(%d pending after the answer)", event.room, event.recovered, event.missed,
                     event.pending)

    def _on_join_refused(self, conn: Connection, event: JoinRefused) -> None:
        self._settled(event.id)
        room = self._rooms.get(event.room)
        if event.retry:
            delay = max(event.error.retry_after or 0.0, 0.25, reconnect_delay(
                "backoff", 2, self._random))
            log.warning("wsserver client: re-join of %r refused (%s); again in %.2f s",
                        event.room, event.error.code, delay)
            self._spawn(self._rejoin_later(conn, event.room, delay))
            return
        if room is None:
            return
        if not room._joined.done():
            room._joined.set_exception(event.error)
        else:
            log.warning("wsserver client: re-join of %r refused: %s", event.room, event.error)
            del self._rooms[event.room]
            room._finish(RoomLost(event.room, event.error.code, event.error))

    async def _rejoin_later(self, conn: Connection, room: str,
                            delay: float) -> None:
        await asyncio.sleep(delay)
        if conn is self._conn:
            msg = self._machine.rejoin(room)
            if msg is not None:
                await self._send_internal(conn, msg)

    async def _refresh(self, conn: Connection) -> None:
        """Answer ``token_expiring`` with a ``refresh`` carrying a new token, in-band."""
        if self._token_refresh is None or self._refreshing:
            return
        self._refreshing = True
        msg_id: str | None = None
        try:
            token = await _call(self._token_refresh)
            self._token = token
            if conn is not self._conn:
                return
            msg = self._machine.request({"type": "refresh", "token": token}, "refresh")
            msg_id = str(msg["id"])
            reply: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
            self._waiters[msg_id] = reply
            await self._send_internal(conn, msg)
            async with asyncio.timeout(self.request_timeout):
                await reply
            log.info("wsserver client: token refreshed in-band, expires at %s",
                     self._machine.expires_at)
        except Exception as error:  # the application's callable, or the server's answer
            # Without a refresh the server closes with 4001 at expiry, and the
            # reconnect asks token_refresh again.
            log.warning("wsserver client: in-band token refresh failed: %r", error)
        finally:
            self._refreshing = False
            if msg_id is not None:
                self._waiters.pop(msg_id, None)

    def _on_unsolicited(self, message: Json) -> None:
        if self.on_event is not None:
            self._call_soon(self.on_event, message)
        elif message.get("type") == "error":
            log.warning("wsserver client: error from the server: %s", message)

    def _resolve(self, msg_id: str, message: Json) -> None:
        waiter = self._waiters.pop(msg_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    def _fail(self, msg_id: str, error: ClientError) -> None:
        waiter = self._waiters.pop(msg_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._settled(msg_id)

    def _stop(self, code: int | None, reason: str, *, by_caller: bool = False) -> None:
        """Stop for good: fail what waits, end the rooms (with the error unless
        the caller closed), and say so to whoever waits for the first welcome."""
        if self._stopped is not None:
            return
        error = Closed(code, reason)
        self._stopped, self._stopped_by_caller = error, by_caller
        self._open = False
        for msg_id in list(self._waiters):
            self._fail(msg_id, error)
        for room in list(self._rooms.values()):
            if not room._joined.done():
                room._joined.set_exception(error)  # its join() is waiting: it raises this
            room._finish(None if by_caller else error)
        self._rooms.clear()
        if self._first is not None and not self._first.done():
            self._first.set_exception(error)
        self._notify()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("wsserver client: background task failed", exc_info=task.exception())

    def _call_soon(self, handler: Callable[[Any], Awaitable[None] | None], arg: Any) -> None:
        try:
            result = handler(arg)
        except Exception:
            log.exception("wsserver client: callback %r failed", handler)
            return
        if inspect.isawaitable(result):
            self._spawn(result)


class Room:
    """A room the client is in: its stream of :class:`Message` and :class:`Gap`, in order.

    Iterate it (``async for item in room``) unless ``on_message`` was given.
    The iteration ends after :meth:`leave` or the client's close, and raises
    :class:`Closed` when the server stopped the client, :class:`RoomLost`
    when the server removed the client from the room.
    """

    def __init__(self, client: Client, name: str, on_message: MessageHandler | None,
                 on_gap: GapHandler | None, on_recovery_failed: GapHandler | None,
                 max_queue: int | None) -> None:
        self.client = client
        self.name = name
        self.on_message = on_message
        self.on_gap = on_gap
        self.on_recovery_failed = on_recovery_failed
        self._inbox: _Inbox[Message | Gap] = _Inbox(max_queue)
        self._joined: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
        self._dispatcher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Room {self.name!r} at {self.position}>"

    @property
    def position(self) -> Position | None:
        """The last message delivered (rooms with history); keep it to resume with ``since``."""
        return self.client._machine.position(self.name)

    @property
    def backlog(self) -> int:
        """Items waiting for the consumer (at most ``max_queue``)."""
        return len(self._inbox)

    async def publish(self, data: Any, *, idempotency_key: str | None = None,
                      timeout: float | None = None) -> Message:
        """Publish ``data`` to the room; the server's copy of it (with its offset
        in a room with history). Waits while ``max_in_flight`` requests are unanswered.

        With ``idempotency_key`` (1 to 128 characters), a publish that failed
        with :class:`ConnectionLost`, ``unavailable`` or a timeout can be made
        again with the same key: the server publishes it once in 5 minutes.
        A repeat of one that went through answers a ``Message`` with
        ``duplicate`` True (``data`` as given here, the first one's offset).

        Raises:
            Forbidden: the token does not grant publishing here.
            ConnectionLost: the connection dropped before the copy came back
                (the message may have been published).
        """
        message: Json = {"type": "publish", "room": self.name, "data": data}
        if idempotency_key is not None:
            message["idempotency_key"] = idempotency_key
        reply = await self.client.request(message, timeout=timeout, kind="publish")
        if reply.get("type") == "published":
            return replace(Message.from_json(reply), data=data, sender=self.client.user)
        return Message.from_json(reply)

    async def presence(self, *, timeout: float | None = None) -> Presence:
        """Who is in the room, on every node."""
        return await self.client.presence(self.name, timeout=timeout)

    async def leave(self, *, timeout: float | None = None) -> None:
        """Leave the room: nothing more is delivered; the iteration ends."""
        await self.client._leave(self, timeout)

    async def wait_closed(self) -> None:
        """Wait until the room's stream ended (after ``on_message`` handled the
        rest); raise what ended it, as the iteration would."""
        if self._dispatcher is not None:
            await asyncio.wait([self._dispatcher])
        error = await self._inbox.ended()
        if error is not None:
            raise error

    def __aiter__(self) -> Room:
        if self.on_message is not None:
            raise TypeError(f"{self.name!r} delivers to on_message; it is not iterated")
        return self

    async def __anext__(self) -> Message | Gap:
        item = await self._inbox.get()
        if isinstance(item, Gap):
            await self._report(item)
        return item

    # --- internals ----------------------------------------------------------------------

    def _start(self) -> None:
        if self.on_message is not None:
            self._dispatcher = asyncio.create_task(self._dispatch(self.on_message),
                                                   name=f"wsserver.client room {self.name}")
            # The client's close() ends it with its other tasks.
            self.client._tasks.add(self._dispatcher)
            self._dispatcher.add_done_callback(self.client._tasks.discard)

    def _finish(self, error: ClientError | None) -> None:
        self._inbox.finish(error)

    async def _dispatch(self, on_message: MessageHandler) -> None:
        while True:
            try:
                item = await self._inbox.get()
            except (StopAsyncIteration, ClientError):
                return
            try:
                if isinstance(item, Gap):
                    await self._report(item)
                else:
                    result = on_message(item)
                    if inspect.isawaitable(result):
                        await result
            except Exception:
                log.exception("wsserver client: a callback of %r failed", self.name)

    async def _report(self, gap: Gap) -> None:
        """Tell the application that messages were lost (the callbacks, else a log line)."""
        handler = self.on_recovery_failed if gap.kind == "recovery_failed" else self.on_gap
        handler = handler or self.on_gap or self.on_recovery_failed
        if handler is None:
            if self.on_message is not None:
                log.warning("wsserver client: messages of %r lost (%s up to %s/%s, dropped %s) "
                            "and no on_gap callback", self.name, gap.kind, gap.epoch, gap.offset,
                            gap.dropped)
            return
        result = handler(gap)
        if inspect.isawaitable(result):
            await result


class _Inbox(Generic[T]):
    """A room's queue: bounded (``put`` waits when full), ended once with an
    optional error that ``get`` raises after the items already in it."""

    def __init__(self, maxsize: int | None) -> None:
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._changed = asyncio.Event()
        self._ended = False
        self._error: ClientError | None = None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: T) -> None:
        while (not self._ended and self._maxsize is not None
               and len(self._items) >= self._maxsize):
            await self._changed.wait()
        if not self._ended:
            self._items.append(item)
            self._notify()

    async def get(self) -> T:
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            await self._changed.wait()
        item = self._items.popleft()
        self._notify()
        return item

    def finish(self, error: ClientError | None) -> None:
        if not self._ended:
            self._ended, self._error = True, error
            self._notify()

    async def ended(self) -> ClientError | None:
        while not (self._ended and not self._items):
            await self._changed.wait()
        return self._error


async def _call(source: Callable[[], T | Awaitable[T]]) -> T:
    """Call a plain or async callable and return its value."""
    result = source()
    if inspect.isawaitable(result):
        return await result
    return result


def _encode(msg: Json) -> str:
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False)


def _token_expiry(token: str) -> float | None:
    """The ``exp`` of a JWT, read without verifying it (the server verifies);
    None for anything else."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else None


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
