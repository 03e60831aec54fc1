"""A recording transport, a fake scheduler and real Services, for Session and Hub tests.

No socket and no Tornado: a :class:`~wsserver.session.Session` talks to a
:class:`RecordingTransport`, whose ``call_later`` goes to a :class:`Scheduler`
the test advances by hand. The Services are the real composition root (the
task pool is built but never started), with a MemoryBroker started on the hub.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

from tests.support.tokens import SECRET, mint
from wsserver import framing
from wsserver.auth import Credentials
from wsserver.brokers.base import Broker
from wsserver.config import load_settings
from wsserver.ratelimit import BucketTable
from wsserver.rooms import RoomPolicy
from wsserver.services import Services
from wsserver.session import Session
from wsserver.transport import Prepared


class _Start:
    """The real wall clock at which the newest fake clock started: tokens are
    minted relative to it, so pyjwt (which reads the real clock) accepts them
    however long the suite has been running."""

    wall = float(int(time.time()))


def wall0() -> float:
    """The wall-clock second at which the newest :class:`Scheduler` started."""
    return _Start.wall


class FakeTimer:
    """One pending ``call_later``."""

    def __init__(self, at: float, callback: Callable[[], None]) -> None:
        self.at = at
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """A monotonic clock that moves only when told, with the timers set on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []
        _Start.wall = self.wall0 = float(int(time.time()))

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.wall0 + self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        assert delay >= 0, delay
        timer = FakeTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    @property
    def pending(self) -> list[FakeTimer]:
        return sorted((t for t in self.timers if not t.cancelled), key=lambda t: t.at)

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every timer that falls due on the way, in order."""
        until = self.now + seconds
        while True:
            due = [t for t in self.pending if t.at <= until]
            if not due:
                break
            timer = due[0]
            self.timers.remove(timer)
            self.now = max(self.now, timer.at)
            timer.callback()
        self.now = until


def decode_frame(frame: bytes) -> tuple[int, bytes]:
    """A server frame's opcode and payload (final, unmasked, as framing.py builds them)."""
    assert frame[0] & 0x80, "not a final frame"
    assert not frame[1] & 0x80, "a server frame is never masked"
    length, start = frame[1] & 0x7F, 2
    if length == 126:
        (length,) = struct.unpack("!H", frame[2:4])
        start = 4
    elif length == 127:
        (length,) = struct.unpack("!Q", frame[2:10])
        start = 10
    payload = frame[start:]
    assert len(payload) == length, (len(payload), length)
    return frame[0] & 0x0F, payload


class RecordingTransport:
    """A :class:`~wsserver.transport.Transport` that records what the session does."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.frames: list[bytes] = []
        self.closes: list[tuple[int, str]] = []
        self.aborted = False
        #: What :meth:`buffered` reports: set it to play a slow reader.
        self.backlog = 0
        #: True between pause_reading() and resume_reading().
        self.paused = False

    kind = "websocket"

    def send(self, message: Prepared) -> bool:
        if self.closes or self.aborted:
            return False
        self.frames.append(message.encoded(framing.text_message))
        return True

    def ping(self) -> None:
        if not (self.closes or self.aborted):
            self.frames.append(framing.PING)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def buffered(self) -> int:
        return self.backlog

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def abort(self) -> None:
        self.aborted = True

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        return self.scheduler.call_later(delay, callback)

    # --- what the tests read ---------------------------------------------------

    @property
    def close_code(self) -> int | None:
        return self.closes[0][0] if self.closes else None

    def messages(self) -> list[dict[str, Any]]:
        """Every text frame sent so far, decoded (pings left out)."""
        out = []
        for frame in self.frames:
            opcode, payload = decode_frame(frame)
            if opcode == 0x1:
                out.append(json.loads(payload))
        return out

    def take(self) -> list[dict[str, Any]]:
        """The messages sent since the last ``take``."""
        messages = self.messages()
        self.frames.clear()
        return messages

    def pings(self) -> int:
        return sum(1 for frame in self.frames if decode_frame(frame)[0] == 0x9)


def make_services(
    rooms: dict[str, Any] | None = None,
    broker: Callable[[Scheduler], Broker] | None = None,
    **flags: str,
) -> tuple[Services, Scheduler]:
    """Real Services with a room policy from a ``[rooms]`` table, and its scheduler.

    The message buckets (and the broker, when ``broker`` builds it) run on the
    scheduler's clock, so a test decides when they refill or expire. Every
    background coroutine is kept, so :func:`settle` can fail on one that raised.
    """
    all_flags = {"jwt_secret": SECRET, "jwt_leeway": "0", **flags}
    settings = load_settings(all_flags, {}, check_files=False)
    settings = settings.replace(
        rooms=RoomPolicy.from_table(rooms or {"join": "anyone", "publish": "members"})
    )
    scheduler = Scheduler()
    services = Services(settings, broker=None if broker is None else broker(scheduler))
    services.message_buckets = BucketTable(
        settings.message_rate, settings.message_burst, scheduler.monotonic
    )
    spawned: list[asyncio.Future[Any]] = []
    spawn = services.spawn

    def recording_spawn(coroutine: Coroutine[Any, Any, Any]) -> None:
        spawn(coroutine)
        spawned.append(next(f for f in services.background if f not in spawned))

    services.spawn = recording_spawn  # type: ignore[method-assign]
    services.hub._spawn = recording_spawn
    services.hub.delivery._spawn = recording_spawn
    SPAWNED[id(services)] = spawned
    return services, scheduler


#: Per Services (by id), every background future it started.
SPAWNED: dict[int, list[asyncio.Future[Any]]] = {}


async def start(services: Services) -> None:
    """Connect the broker to the hub (what Services.start does, without the pool)."""
    await services.broker.start(services.hub)


async def settle(services: Services) -> None:
    """Run the loop until no background work is left; fail if any of it raised."""
    for _ in range(1000):
        await asyncio.sleep(0)
        if not services.background:
            # One more turn: a finished future's callbacks may spawn more.
            await asyncio.sleep(0)
            if not services.background:
                break
    else:
        raise AssertionError("background work never finished")
    for future in SPAWNED.get(id(services), []):
        if future.done() and not future.cancelled() and future.exception() is not None:
            raise AssertionError("background work raised") from future.exception()


async def turns(count: int = 20) -> None:
    """Let the loop run ``count`` steps, for work that waits on purpose (a lagging
    member's catch-up waits for its backlog to drain, which :func:`settle` would not)."""
    for _ in range(count):
        await asyncio.sleep(0)


class Client:
    """One Session over a RecordingTransport, driven like a peer would."""

    def __init__(self, services: Services, scheduler: Scheduler, address: str = "10.0.0.1") -> None:
        self.services = services
        self.transport = RecordingTransport(scheduler)
        self.session = Session(
            services, self.transport, address, address,
            clock=scheduler.monotonic, wall=scheduler.wall,
        )

    async def open(self, tok: str) -> bool:
        return await self.session.open(Credentials(tok, "header"))

    async def send(self, message: dict[str, Any] | str) -> list[dict[str, Any]]:
        """Send one message, let it be served, and take what came back."""
        text = message if isinstance(message, str) else json.dumps(message)
        self.session.on_text(text)
        await settle(self.services)
        return self.transport.take()

    async def ask(self, message: dict[str, Any] | str) -> dict[str, Any]:
        """Send one message and return its one reply."""
        replies = await self.send(message)
        assert len(replies) == 1, replies
        return replies[0]

    def gone(self, code: int = 1006, by_server: bool = False) -> None:
        """The connection went away (what the transport reports)."""
        sent = self.transport.closes
        self.session.on_closed(sent[0][0] if sent else code, "", by_server or bool(sent))


async def welcomed(
    services: Services, scheduler: Scheduler, tok: str | None = None, address: str = "10.0.0.1"
) -> Client:
    """A client past its ``welcome`` (which is checked and taken)."""
    client = Client(services, scheduler, address)
    assert await client.open(tok if tok is not None else mint(now=wall0()))
    (welcome,) = client.transport.take()
    assert welcome["type"] == "welcome", welcome
    return client
