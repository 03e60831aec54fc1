"""The one client helper: real WebSocket clients speaking the server's JSON, with timeouts.

Two real client libraries behind one interface (the brief asks for both):

* :class:`TornadoClient`, ``tornado.websocket``: the default for an in-process
  server (a port on pytest-tornado's loop);
* :class:`WebsocketsClient`, ``websockets``' asyncio client: the default for a
  server process, nginx, or any URL;
* :class:`SyncClient`, ``websockets``' threaded client with the same methods,
  blocking: for tests that drive several processes from plain code (its
  thread answers pings while the test waits on a process or a poll).

Open with :func:`connect` / :func:`welcomed` / :func:`refused` (async) or
:func:`connect_sync` / :func:`welcomed_sync`. A *target* is a port on
127.0.0.1, a ``ws://`` URL, or anything with a ``ws_url`` (``RunningServer``,
``Nginx``). Every message read is decoded JSON; ``recv`` answers None once the
server closed, and every wait fails the test after ``timeout`` seconds.

Every client opened is tracked and closed when the test's loop ends: the
``port`` fixture (in-process servers), :func:`tests.support.aio.run`
(scenarios on a fresh loop) and an autouse fixture (sync clients) call
:func:`close_all`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import jwt
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as ws_connect_sync
from websockets.typing import Origin

from tests.support.tokens import mint

#: How long any single expected event may take before a test fails.
WAIT = 10.0
#: What a room sends unasked: ``ask(..., skip=ROOM_TRAFFIC)`` passes over it.
ROOM_TRAFFIC = frozenset({"message", "user_joined", "user_left", "gap"})
#: The page origin every in-process server allows (``tests/integration/conftest.py``).
ORIGIN = "http://allowed.example"

Message = dict[str, Any]
Outgoing = Message | str | bytes


class HasWsUrl(Protocol):
    @property
    def ws_url(self) -> str: ...


Target = int | str | HasWsUrl


class Discardable(Protocol):
    """What :func:`close_all` needs of a tracked connection."""

    def discard(self) -> None: ...


class AsyncClosable(Protocol):
    """What :func:`aclose_all` needs of a tracked connection that closes by awaiting
    (an HTTP stream's client, :mod:`tests.support.streams`)."""

    async def aclose(self) -> None: ...


_opened: list[Discardable] = []
_opened_async: list[AsyncClosable] = []


def track(conn: Discardable) -> None:
    """Close ``conn`` with every other at the end of the test's loop."""
    _opened.append(conn)


def track_async(conn: AsyncClosable) -> None:
    """Close ``conn`` (awaited) with every other at the end of the test's loop."""
    _opened_async.append(conn)


def close_all() -> None:
    """Close every tracked connection now, without waiting (also those already closed)."""
    while _opened:
        with contextlib.suppress(Exception):
            _opened.pop().discard()


async def aclose_all() -> None:
    """:func:`close_all`, then let the loop run the closes (so no socket is left open)."""
    while _opened_async:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_opened_async.pop().aclose(), WAIT)
    close_all()
    for _ in range(2):
        await asyncio.sleep(0)


class ClosedBeforeWelcome(AssertionError):
    """The server closed the connection before its ``welcome`` (a 4001, 4008...)."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"closed before the welcome: {code} {reason!r}")
        self.code = code
        self.reason = reason


def url_of(target: Target, query: str = "") -> str:
    """The WebSocket URL of ``target``, with ``query`` (``"?token=..."``) appended."""
    if isinstance(target, int):
        base = f"ws://127.0.0.1:{target}/ws"
    elif isinstance(target, str):
        base = target
    else:
        base = target.ws_url
    return base + query


def _headers(tok: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(headers or {})
    if tok is not None:
        merged["Authorization"] = f"Bearer {tok}"
    return merged


def _encode(message: Outgoing) -> str | bytes:
    return message if isinstance(message, str | bytes) else json.dumps(message)


def token_user(tok: str) -> Any:
    """The ``sub`` of a token, read without checking it (None if it has none)."""
    try:
        return jwt.decode(tok, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError:
        return None


def _check_welcome(first: Message | None, client: Any, tok: str) -> Message:
    """``first`` is a welcome naming the token's user."""
    if first is None:
        raise ClosedBeforeWelcome(client.close_code, client.close_reason)
    assert first["type"] == "welcome", first
    if (sub := token_user(tok)) is not None:
        assert first["user"] == sub, first
    return first


# --- async: one base, two libraries -------------------------------------------------


class Conversation:
    """What a test does with a connection, on any transport: ask, wait for a
    message, join, read until a marker or the end. A subclass gives ``send``,
    ``recv`` (None once the server ended it), ``close_code`` and ``close_reason``."""

    welcome: Message | None = None
    close_code: int | None
    close_reason: str | None

    @property
    def user(self) -> Any:
        """The user the welcome named."""
        assert self.welcome is not None, "not welcomed"
        return self.welcome["user"]

    async def send(self, message: Outgoing) -> None:
        raise NotImplementedError

    async def recv(self, timeout: float = WAIT) -> Message | None:
        raise NotImplementedError

    async def ask(self, message: Outgoing, *, skip: Collection[str] = (),
                  timeout: float = WAIT) -> Message:
        """Send ``message``; the next message received, passing over types in ``skip``."""
        await self.send(message)
        return await self.next(lambda m: m["type"] not in skip, timeout)

    async def next(self, wanted: Callable[[Message], bool], timeout: float = WAIT) -> Message:
        """The next message ``wanted`` accepts; others are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            assert message is not None, f"closed: {self.close_code} {self.close_reason}"
            if wanted(message):
                return message

    async def join(self, room: str, **extra: Any) -> Message:
        """Join ``room`` (``extra``: more fields of the join); its ``joined`` reply
        (room traffic before it is passed over)."""
        reply = await self.ask({"type": "join", "room": room, **extra}, skip=ROOM_TRAFFIC)
        assert reply["type"] == "joined", reply
        return reply

    async def messages_until(self, marker: Any, types: Collection[str] | None = ("message", "gap"),
                             timeout: float = WAIT) -> list[Message]:
        """Messages of ``types`` (None: all) received before the room message whose
        data is ``marker`` (excluded)."""
        got: list[Message] = []
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            assert message is not None, f"closed: {self.close_code} {self.close_reason}"
            if message["type"] == "message" and message["data"] == marker:
                return got
            if types is None or message["type"] in types:
                got.append(message)

    async def until_closed(self, timeout: float = WAIT) -> tuple[int | None, list[Message]]:
        """Read until the server ends the connection, within ``timeout`` in all: its
        close code (None when it ended without one), and every message before it."""
        received: list[Message] = []
        deadline = time.monotonic() + timeout
        while (message := await self.recv(max(0.01, deadline - time.monotonic()))) is not None:
            received.append(message)
        return self.close_code, received


class AsyncClient(Conversation):
    """One connection; subclasses bind a library. ``raw`` is the library's own object."""

    raw: Any

    async def send(self, message: Outgoing) -> None:
        """Send a dict as JSON, a str as a text frame, bytes as a binary frame."""
        raise NotImplementedError

    async def _recv_text(self) -> str | bytes | None:
        raise NotImplementedError

    @property
    def close_code(self) -> int | None:  # type: ignore[override]
        raise NotImplementedError

    @property
    def close_reason(self) -> str | None:  # type: ignore[override]
        raise NotImplementedError

    @property
    def subprotocol(self) -> str | None:
        raise NotImplementedError

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake."""
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError

    async def recv(self, timeout: float = WAIT) -> Message | None:
        """The next message, decoded; None once the server closed."""
        try:
            text = await asyncio.wait_for(self._recv_text(), timeout)
        except TimeoutError:
            raise AssertionError(f"nothing received within {timeout} s") from None
        if text is None:
            return None
        message: Message = json.loads(text)
        return message


class TornadoClient(AsyncClient):
    """``tornado.websocket.websocket_connect``'s connection."""

    def __init__(self, raw: WebSocketClientConnection) -> None:
        self.raw = raw

    @classmethod
    async def open(cls, url: str, headers: dict[str, str], subprotocols: list[str] | None,
                   **options: Any) -> TornadoClient:
        conn = await websocket_connect(HTTPRequest(url, headers=headers),
                                       subprotocols=subprotocols, **options)
        client = cls(conn)
        track(client)
        return client

    async def send(self, message: Outgoing) -> None:
        data = _encode(message)
        await self.raw.write_message(data, binary=isinstance(data, bytes))

    async def _recv_text(self) -> str | bytes | None:
        text: str | bytes | None = await self.raw.read_message()
        return text

    @property
    def close_code(self) -> int | None:
        code: int | None = self.raw.close_code
        return code

    @property
    def close_reason(self) -> str | None:
        reason: str | None = self.raw.close_reason
        return reason

    @property
    def subprotocol(self) -> str | None:
        selected: str | None = self.raw.selected_subprotocol
        return selected

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.raw.close(code, reason)

    def discard(self) -> None:
        self.raw.close()


class WebsocketsClient(AsyncClient):
    """``websockets.asyncio.client.connect``'s connection."""

    def __init__(self, raw: ClientConnection) -> None:
        self.raw = raw

    @classmethod
    async def open(cls, url: str, headers: dict[str, str], subprotocols: list[str] | None,
                   origin: str | None = None, **options: Any) -> WebsocketsClient:
        options.setdefault("open_timeout", WAIT)
        conn = await ws_connect(
            url, additional_headers=headers, origin=None if origin is None else Origin(origin),
            subprotocols=subprotocols, **options,  # type: ignore[arg-type]
        )
        client = cls(conn)
        track(client)
        return client

    async def send(self, message: Outgoing) -> None:
        await self.raw.send(_encode(message))

    async def _recv_text(self) -> str | bytes | None:
        try:
            text: str | bytes = await self.raw.recv()
        except ConnectionClosed:
            return None
        return text

    @property
    def close_code(self) -> int | None:
        code: int | None = self.raw.close_code
        return code

    @property
    def close_reason(self) -> str | None:
        reason: str | None = self.raw.close_reason
        return reason

    @property
    def subprotocol(self) -> str | None:
        selected: str | None = self.raw.subprotocol
        return selected

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.raw.close(code, reason)

    def discard(self) -> None:
        self.raw.transport.abort()


Library = Literal["tornado", "websockets"]


async def connect(
    target: Target,
    tok: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    subprotocols: list[str] | None = None,
    query: str = "",
    origin: str | None = None,
    library: Library | None = None,
    **options: Any,
) -> AsyncClient:
    """An open connection to ``target`` with ``tok`` as a Bearer header (not yet welcomed).

    ``library``: ``tornado`` (default for a port) or ``websockets`` (default
    otherwise); ``options`` go to that library's connect (``ssl``, ``max_size``...).
    """
    if library is None:
        library = "tornado" if isinstance(target, int) else "websockets"
    url = url_of(target, query)
    all_headers = _headers(tok, headers)
    if library == "tornado":
        if origin is not None:
            all_headers["Origin"] = origin
        return await TornadoClient.open(url, all_headers, subprotocols, **options)
    return await WebsocketsClient.open(url, all_headers, subprotocols, origin, **options)


async def welcomed(target: Target, tok: str | None = None, **kw: Any) -> AsyncClient:
    """A connection past its ``welcome`` (kept in ``.welcome``; it names the token's
    user). ``tok`` defaults to :func:`~tests.support.tokens.mint`'s."""
    tok = mint() if tok is None else tok
    client = await connect(target, tok, **kw)
    client.welcome = _check_welcome(await client.recv(), client, tok)
    return client


async def welcomed_without_token(target: Target, user: str, **kw: Any) -> AsyncClient:
    """A connection that sends no JWT (the connect proxy vouches for it, from the
    cookies or headers in ``kw``), past its ``welcome``, which must name ``user``."""
    client = await connect(target, None, **kw)
    first = await client.recv()
    if first is None:
        raise ClosedBeforeWelcome(client.close_code, client.close_reason)
    assert first["type"] == "welcome" and first["user"] == user, first
    client.welcome = first
    return client


@dataclass
class Refusal:
    """The HTTP answer to a handshake refused before the upgrade."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def refused(target: Target, tok: str | None = None, **kw: Any) -> Refusal:
    """Connect expecting a refusal before the upgrade (403, 429, 503...); its answer."""
    try:
        client = await connect(target, tok, **kw)
    except HTTPClientError as error:
        assert error.response is not None, error
        return Refusal(error.code, error.response.headers, error.response.body)
    except InvalidStatus as error:
        return Refusal(error.response.status_code, error.response.headers,
                       bytes(error.response.body or b""))
    client.discard()
    raise AssertionError("the handshake was not refused: the connection was upgraded")


# --- sync: the same methods, blocking ----------------------------------------------


class SyncClient:
    """``websockets.sync.client.connect``'s connection, with :class:`AsyncClient`'s
    methods, blocking."""

    welcome: Message | None = None

    @property
    def user(self) -> Any:
        """The user the welcome named."""
        assert self.welcome is not None, "not welcomed"
        return self.welcome["user"]

    def __init__(self, url: str, headers: dict[str, str], subprotocols: list[str] | None,
                 origin: str | None = None, **options: Any) -> None:
        options.setdefault("open_timeout", WAIT)
        options.setdefault("close_timeout", 2)
        # An unbounded queue: the thread keeps reading (and answering pings)
        # however far behind the test is.
        options.setdefault("max_queue", None)
        # Entered as a context manager, as websockets (17.1+) wants it used.
        self._stack = contextlib.ExitStack()
        self.raw: SyncConnection = self._stack.enter_context(ws_connect_sync(
            url, additional_headers=headers, origin=None if origin is None else Origin(origin),
            subprotocols=subprotocols, **options,  # type: ignore[arg-type]
        ))
        track(self)

    def send(self, message: Outgoing) -> None:
        self.raw.send(_encode(message))

    def recv(self, timeout: float = WAIT) -> Message | None:
        try:
            text = self.raw.recv(timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"nothing received within {timeout} s") from None
        except ConnectionClosed:
            return None
        message: Message = json.loads(text)
        return message

    def ask(self, message: Outgoing, *, skip: Collection[str] = (),
            timeout: float = WAIT) -> Message:
        self.send(message)
        return self.next(lambda m: m["type"] not in skip, timeout)

    def next(self, wanted: Callable[[Message], bool], timeout: float = WAIT) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            assert message is not None, f"closed: {self.close_code} {self.close_reason}"
            if wanted(message):
                return message

    def join(self, room: str) -> Message:
        reply = self.ask({"type": "join", "room": room}, skip=ROOM_TRAFFIC)
        assert reply["type"] == "joined", reply
        return reply

    def messages_until(self, marker: Any, types: Collection[str] | None = ("message", "gap"),
                       timeout: float = WAIT) -> list[Message]:
        got: list[Message] = []
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            assert message is not None, f"closed: {self.close_code} {self.close_reason}"
            if message["type"] == "message" and message["data"] == marker:
                return got
            if types is None or message["type"] in types:
                got.append(message)

    def until_closed(self, timeout: float = WAIT) -> tuple[int | None, list[Message]]:
        received: list[Message] = []
        deadline = time.monotonic() + timeout
        while (message := self.recv(max(0.01, deadline - time.monotonic()))) is not None:
            received.append(message)
        return self.close_code, received

    @property
    def close_code(self) -> int | None:
        code: int | None = self.raw.close_code
        return code

    @property
    def close_reason(self) -> str | None:
        reason: str | None = self.raw.close_reason
        return reason

    @property
    def subprotocol(self) -> str | None:
        selected: str | None = self.raw.subprotocol
        return selected

    def close(self) -> None:
        self._stack.close()

    def discard(self) -> None:
        self._stack.close()


def connect_sync(target: Target, tok: str | None = None, *,
                 headers: Mapping[str, str] | None = None,
                 subprotocols: list[str] | None = None, query: str = "",
                 origin: str | None = None, **options: Any) -> SyncClient:
    """:func:`connect`, blocking (always ``websockets``)."""
    return SyncClient(url_of(target, query), _headers(tok, headers), subprotocols, origin,
                      **options)


def welcomed_sync(target: Target, tok: str | None = None, **kw: Any) -> SyncClient:
    """:func:`welcomed`, blocking."""
    tok = mint() if tok is None else tok
    client = connect_sync(target, tok, **kw)
    try:
        client.welcome = _check_welcome(client.recv(), client, tok)
    except BaseException:
        client.close()
        raise
    return client
