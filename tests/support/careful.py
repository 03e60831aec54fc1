"""A careful client: what a user who read docs/protocol.md writes, over ``websockets``.

It joins its rooms, keeps a :class:`~tests.support.ledger.RoomLedger` per room
(its position, every delivery, every range it was told about), and when the
connection ends in any way (a close frame with 1001/1011/1012/4009..., or a
dropped TCP connection) it reconnects with backoff, alternating between the
nodes it knows, and re-joins every room with ``since``. A join answered
``unavailable`` (the broker is down) is retried with backoff. Messages are
handled strictly by offset, so a ``joined`` answer carrying only part of the
missed messages (``"pending": N``, the rest following as ordinary messages)
needs nothing special.

What a client must never see is recorded as a
:class:`~tests.support.ledger.Violation` as it arrives: a close with 4009 or
4029 (the round-3 contract forbids both for a reader, and for a sender within
its rate), an error answer to a join other than ``unavailable``, a ``left``
it did not ask for.

The test drives faults from outside: :meth:`CarefulClient.drop` cuts the TCP
connection without a close frame, :meth:`CarefulClient.stall` stops reading
the socket until :meth:`CarefulClient.resume`, and
:meth:`CarefulClient.leave` / :meth:`CarefulClient.rejoin` churn a room.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.protocol import State

from tests.support.ledger import Ack, Epochs, Position, RoomLedger, Violation

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0
#: A handshake (TCP, upgrade, welcome) that takes longer is given up and retried.
#: Generous: on a loaded machine a node may take seconds to answer, and giving
#: up only to try again costs both sides more; :meth:`CarefulClient.stop`
#: never waits for it.
OPEN_TIMEOUT = 15.0
#: How long the closing handshake may take before the connection is cut.
CLOSE_TIMEOUT = 5.0
#: How long :meth:`CarefulClient.stop` waits for the connection loop to end once
#: its connection is closed (it ends at once; this bounds a harness bug).
STOP_TIMEOUT = 30.0
#: Close codes after which a careful client reconnects (with backoff), as
#: docs/protocol.md says; a dropped connection reads as 1006. Anything else
#: ends it, as a violation.
RECONNECT_CODES = frozenset({1001, 1006, 1011, 1012, 4008, 4009, 4029})
#: Close codes the round-3 contract forbids for a client within its rate.
FORBIDDEN_CODES = frozenset({4009, 4029})


class Progress:
    """Wakes whoever waits for clients to move (each message handled sets it)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        #: When a client last received anything.
        self.last = time.monotonic()

    def moved(self) -> None:
        self.last = time.monotonic()
        self.event.set()

    async def until(self, done: Any, timeout: float, quiet: float | None = None) -> bool:
        """Until ``done()`` holds (re-checked after each move); False after
        ``timeout``, or once nothing moved for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (quiet is not None and time.monotonic() - self.last > quiet):
                return False
            self.event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), min(remaining, 0.5))
        return True


class Pace:
    """The client's own token bucket, kept under the one the server announced in
    its welcome (``limits.message_rate`` / ``message_burst``): a careful client
    never gets ``rate_limited``. It outlives reconnects, as the server's does."""

    def __init__(self, share: float = 0.8) -> None:
        self.share = share
        self.rate = 0.0
        self.burst = 1.0
        self.tokens = 1.0
        self.at = time.monotonic()
        self._lock = asyncio.Lock()

    def configure(self, limits: dict[str, Any]) -> None:
        if self.rate:
            return
        self.rate = float(limits.get("message_rate", 10)) * self.share
        self.burst = max(1.0, min(5.0, float(limits.get("message_burst", 20)) / 4))
        self.tokens = self.burst

    async def take(self) -> None:
        """Until a message may be sent."""
        async with self._lock:
            while True:
                now = time.monotonic()
                if self.rate:
                    self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
                self.at = now
                if self.tokens >= 1 or not self.rate:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


@dataclass(frozen=True)
class Closed:
    """How one connection ended."""

    conn: int
    node: str
    code: int
    reason: str
    by_us: bool


class CarefulClient:
    """One user's connection that comes back, and its ledgers.

    Args:
        name: how reports name it (``c07``).
        token: its JWT.
        nodes: the ``ws://`` URLs it may connect to; it starts with ``nodes[home]``
            and moves to the next one at every new connection.
        rooms: the rooms it joins (all with history).
        rcvbuf: SO_RCVBUF of its socket (a small one makes a stalled reader's
            backlog reach the server quickly).
        max_queue: frames ``websockets`` buffers before it stops reading the socket.
        lazy: join nothing until :meth:`rejoin` is called.
    """

    def __init__(
        self, name: str, token: str, nodes: Sequence[str], rooms: Sequence[str],
        epochs: Epochs, progress: Progress, *, home: int = 0, rcvbuf: int | None = None,
        max_queue: int = 64, lazy: bool = False,
    ) -> None:
        self.name = name
        self.token = token
        self.nodes = list(nodes)
        self.home = home
        self.rcvbuf = rcvbuf
        self.max_queue = max_queue
        self.progress = progress
        self.ledgers = {room: RoomLedger(name, room, epochs) for room in rooms}
        #: Rooms it means to be in (re-joined after every reconnect).
        self.wanted = set() if lazy else set(rooms)
        self.closes: list[Closed] = []
        self.violations: list[Violation] = []
        self.connections = 0
        self.refusals = 0
        self._ws: ClientConnection | None = None
        self._members: set[str] = set()
        self._joins: dict[str, tuple[str, bool]] = {}
        self._leaves: dict[str, str] = {}
        #: Answers ``unavailable`` to a leave (outside the contract's list; counted).
        self.leaves_unavailable = 0
        #: Its own publishes: sent (id → room), and those whose copy came back.
        self._publishing: dict[str, str] = {}
        self.own_acks: list[Ack] = []
        self.published = 0
        #: Its publishes answered ``unavailable`` (told: not lost silently; counted).
        self.publishes_refused = 0
        self._serial = 0
        self._stopping = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._dropped = False
        self._task: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()
        self._rng = random.Random(name)
        self._pace = Pace()

    # --- what the test does to it ---------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Close with 1000 and stop reconnecting; returns once the connection loop
        has ended, and at once when called again.

        The loop ending cancelled is a normal end (a previous :meth:`stop` cut
        it short, or the test cancelled it); a cancellation of the caller still
        propagates, and takes the loop with it. An exception the loop ended
        with (a bug of the harness) is raised here.
        """
        self._stopping.set()
        self._reading.set()
        task = self._task
        try:
            ws = self._ws
            if ws is not None:
                await _close(ws)
            if task is not None:
                await asyncio.wait({task}, timeout=STOP_TIMEOUT)
        finally:
            if task is not None and not task.done():
                task.cancel()  # _serve cuts its connection on the way out
                await asyncio.wait({task})
        # After the loop: it can start chores until its connection is gone.
        chores = list(self._chores)
        for chore in chores:
            chore.cancel()
        await asyncio.gather(*chores, return_exceptions=True)
        if task is not None and not task.cancelled():
            error = task.exception()
            if error is not None:
                raise error

    def drop(self, reset: bool = True) -> bool:
        """Cut the TCP connection without a close frame (``reset``: with an RST,
        else a FIN); it reconnects. False when not connected."""
        ws = self._ws
        if ws is None:
            return False
        sock = ws.transport.get_extra_info("socket")
        if reset and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._dropped = True
        ws.transport.abort()
        return True

    def stall(self) -> None:
        """Stop reading the socket (the server's writes pile up) until :meth:`resume`."""
        self._reading.clear()

    def resume(self, rcvbuf: int = 1 << 20) -> None:
        """Read again, through a socket buffer of ``rcvbuf`` bytes from now on (the
        link got better: what piled up drains in seconds, not minutes)."""
        ws = self._ws
        sock = None if ws is None else ws.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.rcvbuf = rcvbuf
        self._reading.set()

    async def leave(self, room: str) -> None:
        """Leave ``room`` (stays out until :meth:`rejoin`)."""
        self.wanted.discard(room)
        ws = self._ws
        if ws is not None and room in self._members:
            await self._leave(ws, room)

    async def _leave(self, ws: ClientConnection, room: str) -> None:
        await self._send(ws, self._leave_message(room))

    def _leave_message(self, room: str) -> str:
        self._serial += 1
        ident = f"l{self._serial}"
        self._leaves[ident] = room
        return json.dumps({"type": "leave", "room": room, "id": ident})

    async def rejoin(self, room: str, with_since: bool = True) -> None:
        """Join ``room`` again, asking for what it missed (or not: the gap is then
        the client's own choice, recorded as told)."""
        self.wanted.add(room)
        ws = self._ws
        if ws is not None and room not in self._members and room not in self._joining():
            await self._join(ws, room, with_since)

    async def publish(self, room: str, count: int) -> None:
        """Send ``count`` publishes into ``room`` back to back, without waiting for
        any answer (a relay with a raised message rate): the caller keeps
        ``count`` within the burst the welcome announced. Each one's copy, which
        carries its ``id``, is its acknowledgement."""
        ws = self._ws
        if ws is None or room not in self._members:
            return  # reconnecting: the caller waits for joined() first
        burst = []
        for _ in range(count):
            self.published += 1
            uid = f"{self.name}-pub{self.published}"
            self._publishing[uid] = room
            burst.append(json.dumps(
                {"type": "publish", "room": room, "data": {"uid": uid}, "id": uid}
            ))
        with contextlib.suppress(ConnectionClosed):
            for text in burst:
                await ws.send(text)

    def connected(self) -> bool:
        return self._ws is not None

    def running(self) -> bool:
        """Its connection loop has started and not ended (:meth:`stop` ends it)."""
        return self._task is not None and not self._task.done()

    def joined(self) -> bool:
        """A member of every room it wants, on the current connection."""
        return self._ws is not None and self.wanted <= self._members

    def reached(self, finals: dict[str, Position]) -> bool:
        """Every room it wants is at or past the room's final position."""
        return all(self.ledgers[r].reached(finals[r]) for r in self.wanted if r in finals)

    def where(self) -> str:
        return ", ".join(f"{r} at {ledger.position}" for r, ledger in sorted(self.ledgers.items()))

    # --- the connection loop ----------------------------------------------------

    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        thrown_out = 0  # 4009/4029 closes in a row: the backoff grows with them
        while not self._stopping.is_set():
            url = self.nodes[(self.home + self.connections + self.refusals) % len(self.nodes)]
            try:
                ws = await self._open_unless_stopped(url)
            except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed):
                self.refusals += 1
                await self._pause(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if ws is None:
                return  # stopped while opening
            delay = BACKOFF_FIRST
            self.connections += 1
            code = await self._serve(ws, url, self.connections)
            if code not in RECONNECT_CODES:
                return
            if code in FORBIDDEN_CODES:
                thrown_out += 1
                await self._pause(min(0.1 * 2 ** thrown_out, 2.0))
            else:
                thrown_out = 0
                await self._pause(self._rng.uniform(0.02, 0.1))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds * self._rng.uniform(0.5, 1.0))

    async def _open_unless_stopped(self, url: str) -> ClientConnection | None:
        """:meth:`_open`, given up as soon as :meth:`stop` is called: None then.

        :meth:`stop` closes the connection being served; one still being opened
        is this method's to close, or a handshake that ends after :meth:`stop`
        would be served (and read) until the loop is cancelled.
        """
        opening = asyncio.ensure_future(self._open(url))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: what it opened goes with it
            await _abandon(opening)
            raise
        finally:
            stopping.cancel()
        if self._stopping.is_set():
            await _abandon(opening)
            return None
        return opening.result()

    async def _open(self, url: str) -> ClientConnection:
        """A connection past its welcome; on any failure (a refusal, a timeout, a
        cancellation, a bad first message) whatever was opened is closed."""
        sock = None
        try:
            if self.rcvbuf is not None:
                parts = urlsplit(url)
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                sock.setblocking(False)
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
                    sock, (parts.hostname or "127.0.0.1", parts.port or 80)), OPEN_TIMEOUT)
            # websockets cuts the connection itself when its handshake fails, times
            # out or is cancelled; a socket it never took over is closed below.
            ws = await connect(
                url, sock=sock, additional_headers={"Authorization": f"Bearer {self.token}"},
                open_timeout=OPEN_TIMEOUT, close_timeout=CLOSE_TIMEOUT, ping_interval=None,
                max_size=None, max_queue=self.max_queue,
            )
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        text: str | bytes = ""
        try:
            text = await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT)
            welcome = json.loads(text)
            if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
                raise InvalidHandshake(f"first message {text!r:.200}")
        except BaseException as error:
            ws.transport.abort()
            if isinstance(error, ValueError):
                raise InvalidHandshake(f"first message {text!r:.200}") from error
            raise
        self._pace.configure(welcome.get("limits", {}))
        return ws

    async def _serve(self, ws: ClientConnection, url: str, conn: int) -> int:
        """One connection, from its welcome to its end: the close code."""
        self._ws, self._members, self._joins, self._leaves = ws, set(), {}, {}
        self._dropped = False
        node = urlsplit(url).netloc
        try:
            for room in sorted(self.wanted):
                await self._join(ws, room, with_since=self.ledgers[room].position is not None)
            while True:
                await self._reading.wait()
                message = json.loads(await ws.recv())
                self._handle(ws, message, conn)
                if message.get("type") in ("message", "gap", "joined"):
                    self.progress.moved()
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self._members = set()
            if ws.state is not State.CLOSED:
                # Left by a cancellation or an error, not by the connection's end:
                # cut it, so no socket outlives its client.
                ws.transport.abort()
        code = ws.close_code if ws.close_code is not None else 1006
        reason = ws.close_reason or ""
        by_us = self._dropped or self._stopping.is_set()
        self.closes.append(Closed(conn, node, code, reason, by_us))
        self.progress.event.set()
        if by_us:
            return 1006 if self._dropped else 1000
        if code in FORBIDDEN_CODES:
            self._violate("closed-" + str(code), f"connection {conn} on {node} closed {code} "
                          f"{reason!r}")
        elif code not in RECONNECT_CODES:
            self._violate("closed", f"connection {conn} on {node} closed {code} {reason!r}; "
                          "a careful client does not come back after that")
        return code

    async def _join(self, ws: ClientConnection, room: str, with_since: bool) -> None:
        await self._send(ws, self._join_message(room, with_since))

    def _join_message(self, room: str, with_since: bool) -> str:
        """A join, registered now (so a second one is never sent meanwhile)."""
        self._serial += 1
        ident = f"j{self._serial}"
        message: dict[str, Any] = {"type": "join", "room": room, "id": ident}
        position = self.ledgers[room].position
        if with_since and position is not None:
            message["since"] = {"epoch": position[0], "offset": position[1]}
        self._joins[ident] = (room, with_since and position is not None)
        return json.dumps(message)

    async def _send(self, ws: ClientConnection, text: str) -> None:
        await self._pace.take()
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)

    async def _retry_join(self, ws: ClientConnection, room: str, delay: float) -> None:
        await self._pause(delay)
        if (self._ws is ws and room in self.wanted and room not in self._members
                and room not in self._joining()):
            await self._join(ws, room, with_since=self.ledgers[room].position is not None)

    async def _retry_leave(self, ws: ClientConnection, room: str, delay: float) -> None:
        await self._pause(delay)
        if self._ws is ws and room in self._members:
            await self._leave(ws, room)

    def _handle(self, ws: ClientConnection, message: dict[str, Any], conn: int) -> None:
        kind = message.get("type")
        room = message.get("room")
        ledger = self.ledgers.get(room) if isinstance(room, str) else None
        if kind == "message":
            if ledger is None:
                self._violate("foreign-message", f"message of a room never joined: {room!r}")
                return
            ledger.on_message(message, conn)
            mine = self._publishing.pop(str(message.get("id")), None)
            if mine is not None:
                self.own_acks.append(Ack(mine, message["epoch"], message["offset"],
                                         str(message["id"])))
        elif kind == "gap":
            if ledger is not None:
                ledger.on_gap(message)
        elif kind == "joined":
            pending = self._joins.pop(str(message.get("id")), None)
            if pending is None or ledger is None:
                self._violate("unasked-joined", f"{message!r:.200}")
                return
            self._members.add(pending[0])
            ledger.on_joined(message, pending[1], conn)
            if room not in self.wanted:  # left meanwhile: leave now
                self._chore(self._send(ws, self._leave_message(str(room))))
        elif kind == "left":
            self._leaves.pop(str(message.get("id")), None)
            self._members.discard(str(room))
            if message.get("reason"):
                self._violate("left", f"left {room!r} unasked: {message.get('reason')!r}")
            elif room in self.wanted and room not in self._joining():
                # Wanted again while the leave was on its way: join again now.
                self._chore(self._send(ws, self._join_message(str(room), with_since=True)))
        elif kind == "error":
            ident = str(message.get("id"))
            if self._publishing.pop(ident, None) is not None:
                if message.get("code") == "unavailable":
                    self.publishes_refused += 1
                else:
                    self._violate("error", f"a publish within the rate answered {message!r:.200}")
                return
            joining = self._joins.pop(ident, None)
            leaving = self._leaves.pop(ident, None)
            if joining is not None and message.get("code") == "unavailable":
                self._chore(self._retry_join(ws, joining[0], 0.2))
            elif joining is not None and message.get("code") == "rate_limited":
                # Never while the client keeps to its pace; retried all the same,
                # so one slip shows as itself and not as everything after it.
                self._violate("error", f"answered {message!r:.200}")
                self._chore(self._retry_join(ws, joining[0],
                                             float(message.get("retry_after", 0.5)) + 0.1))
            elif leaving is not None and message.get("code") == "unavailable":
                # The docs do not list leave among what the broker's outage
                # refuses; a careful client retries it all the same.
                self.leaves_unavailable += 1
                self._chore(self._retry_leave(ws, leaving, 0.2))
            else:
                self._violate("error", f"answered {message!r:.200}")

    def _joining(self) -> set[str]:
        return {room for room, _ in self._joins.values()}

    def _chore(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _violate(self, kind: str, detail: str) -> None:
        self.violations.append(Violation(kind, self.name, "-", detail))


async def _close(ws: ClientConnection) -> None:
    """The closing handshake (1000), bounded; the connection is cut if it does not end."""
    try:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT * 2)
    finally:
        if ws.state is not State.CLOSED:
            ws.transport.abort()


async def _abandon(opening: asyncio.Future[ClientConnection]) -> None:
    """Cancel a connection being opened and cut it if it was opened all the same."""
    opening.cancel()
    await asyncio.wait({opening})
    if not opening.cancelled() and opening.exception() is None:
        opening.result().transport.abort()
