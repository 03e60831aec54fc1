"""Clients for the abuse-control tests: tokens, a raw WebSocket client, metrics.

The raw client speaks just enough RFC 6455 to do what well-behaved libraries
refuse to do: read the exact HTTP answer to a refused handshake (status and
``Retry-After``), pipeline frames right behind the handshake, stop reading, or
vanish without a close frame.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

#: The key the server is started with (tests/integration/conftest.py has a
#: module of the same import name, so nothing is imported from tests/conftest.py).
SECRET = "limits-secret-0123456789-abcdefghijklmn"
#: The environment that gives the server a known key, so tests sign their own tokens.
JWT_ENV = {"WSSERVER_JWT_SECRET": SECRET}
#: Handshake bucket wide enough that tests about other limits never hit it.
NO_HANDSHAKE_LIMIT = ("--handshake-rate", "1000", "--handshake-burst", "1000")
#: How long any single expected event may take before a test fails.
EVENT_TIMEOUT = 10.0


class RunningServer(Protocol):
    """What these tests use of ``tests/conftest.py``'s ``RunningServer``."""

    @property
    def pid(self) -> int: ...
    @property
    def port(self) -> int: ...
    @property
    def ws_url(self) -> str: ...
    def logs(self) -> str: ...
    def metrics(self) -> str: ...
    def wait_for_log(self, pattern: str | re.Pattern[str],
                     timeout: float = 10.0) -> re.Match[str]: ...


OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def make_token(user: str, ttl: int = 600, secret: str = SECRET) -> str:
    """An HS256 token for ``user`` valid for ``ttl`` seconds."""
    # Grants for every room: these tests exercise limits, not room permissions.
    claims = {"sub": user, "exp": int(time.time()) + ttl, "rooms": ["*"], "publish": ["*"]}
    return jwt.encode(claims, secret, algorithm="HS256")


def bearer(user: str) -> dict[str, str]:
    """The ``Authorization`` header for ``user``."""
    return {"Authorization": f"Bearer {make_token(user)}"}


# --- running a scenario --------------------------------------------------------

#: Every connection opened by the running scenario, closed when it ends (also
#: when it fails, so a failing test reports its assertion, not unclosed sockets).
_opened: list[RawConnection | ClientConnection] = []


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run ``scenario`` in a fresh event loop, then drop what it left open."""

    async def main() -> None:
        try:
            await scenario()
        finally:
            while _opened:
                conn = _opened.pop()
                if isinstance(conn, RawConnection):
                    conn.writer.transport.abort()
                else:
                    conn.transport.abort()

    asyncio.run(main())


# --- websockets (a well-behaved client) ------------------------------------


async def open_client(
    srv: RunningServer, user: str, *, headers: dict[str, str] | None = None, **kwargs: Any
) -> ClientConnection:
    """A connected ``websockets`` client for ``user``, its welcome already read."""
    ws = await connect(srv.ws_url, additional_headers={**bearer(user), **(headers or {})},
                       open_timeout=EVENT_TIMEOUT, **kwargs)
    _opened.append(ws)
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    assert welcome["user"] == user
    return ws


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    """The next message, decoded; fails the test if none comes in time."""
    message = await asyncio.wait_for(ws.recv(), EVENT_TIMEOUT)
    decoded: dict[str, Any] = json.loads(message)
    return decoded


async def request(ws: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    """Send ``message`` and return the next message received."""
    await ws.send(json.dumps(message))
    return await recv_json(ws)


async def until_closed(ws: ClientConnection) -> tuple[int | None, list[dict[str, Any]]]:
    """Read until the server closes; its close code and what came before it."""
    received: list[dict[str, Any]] = []
    try:
        while True:
            received.append(json.loads(await asyncio.wait_for(ws.recv(), EVENT_TIMEOUT)))
    except ConnectionClosed as closed:
        return (closed.rcvd.code if closed.rcvd is not None else None), received


# --- a raw client -------------------------------------------------------------


@dataclass
class Frame:
    """One frame from the server (never masked, RFC 6455 section 5.1)."""

    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        assert self.opcode == OP_CLOSE
        return struct.unpack(">H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    def json(self) -> dict[str, Any]:
        assert self.opcode == OP_TEXT, self
        decoded: dict[str, Any] = json.loads(self.payload)
        return decoded


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, final client frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = struct.pack(">BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        header = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def text_frame(message: dict[str, Any]) -> bytes:
    """A client text frame carrying ``message`` as JSON."""
    return client_frame(OP_TEXT, json.dumps(message).encode())


def close_frame(code: int = 1000) -> bytes:
    return client_frame(OP_CLOSE, struct.pack(">H", code))


def upgrade_request(headers: dict[str, str], path: str = "/ws") -> bytes:
    """The bytes of a WebSocket upgrade request (RFC 6455 section 4.1)."""
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class RawConnection:
    """A TCP connection that sent an upgrade request, and the HTTP answer to it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    headers: dict[str, str] = field(default_factory=dict)

    async def read_frame(self, timeout: float = EVENT_TIMEOUT) -> Frame:
        """The next frame; raises ``asyncio.IncompleteReadError`` at EOF."""
        return await asyncio.wait_for(self._read_frame(), timeout)

    async def _read_frame(self) -> Frame:
        first, second = await self.reader.readexactly(2)
        assert not second & 0x80, "server frames are never masked"
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack(">H", await self.reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack(">Q", await self.reader.readexactly(8))
        return Frame(first & 0x0F, await self.reader.readexactly(size))

    async def read_json(self) -> dict[str, Any]:
        """The next text frame, decoded (pings are skipped)."""
        while True:
            frame = await self.read_frame()
            if frame.opcode != OP_PING:
                return frame.json()

    async def read_until_close(self) -> tuple[int | None, list[Frame]]:
        """Frames up to the server's close frame; its code and what came before."""
        frames: list[Frame] = []
        while True:
            frame = await self.read_frame()
            if frame.opcode == OP_CLOSE:
                return frame.close_code, frames
            frames.append(frame)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_eof(self, timeout: float = EVENT_TIMEOUT) -> bytes:
        """Read until the server closes the TCP connection; what was read."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def close_cleanly(self) -> None:
        """The closing handshake from our side: close frame, their close, EOF."""
        await self.send(close_frame())
        await self.read_until_close()
        await self.wait_eof()
        self.drop()

    async def close_cleanly_after_server_close(self) -> None:
        """Answer the close frame already read from the server, then wait for EOF.

        A server that refused the connection may already have cut it (it does
        not wait for this answer), so a reset here is the expected end too.
        """
        try:
            await self.send(close_frame())
            await self.wait_eof()
        except (ConnectionResetError, BrokenPipeError):
            pass
        self.drop()

    def drop(self) -> None:
        """Close the socket without a close frame (a FIN)."""
        self.writer.close()

    def reset(self) -> None:
        """Vanish abruptly: the kernel sends an RST (SO_LINGER with a zero timeout)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


async def raw_connect(
    srv: RunningServer,
    headers: dict[str, str] | None = None,
    *,
    source: str = "127.0.0.1",
    pipelined: bytes = b"",
    rcvbuf: int | None = None,
) -> RawConnection:
    """Send an upgrade request from ``source`` and read the HTTP answer's head.

    Args:
        headers: extra request headers (the token, proxy headers).
        source: the local address to connect from (any 127.0.0.0/8 address
            reaches the server and counts as a different client).
        pipelined: bytes sent in the same write right after the request.
        rcvbuf: SO_RCVBUF set before connecting (a small window for a client
            that will stop reading).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    conn = RawConnection(reader, writer, 0)
    _opened.append(conn)
    writer.write(upgrade_request(headers or {}) + pipelined)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EVENT_TIMEOUT)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    conn.status = int(status_line.split()[1])
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            conn.headers[name.strip().lower()] = value.strip()
    return conn


async def raw_open(srv: RunningServer, user: str, *, source: str = "127.0.0.1",
                   headers: dict[str, str] | None = None) -> RawConnection:
    """A raw connection for ``user`` that was upgraded and welcomed."""
    conn = await raw_connect(srv, {**bearer(user), **(headers or {})}, source=source)
    assert conn.status == 101, conn
    welcome = await conn.read_json()
    assert welcome["type"] == "welcome" and welcome["user"] == user, welcome
    return conn


async def refused_status(srv: RunningServer, headers: dict[str, str] | None = None, *,
                         source: str = "127.0.0.1") -> RawConnection:
    """A handshake expected to be refused before the upgrade; closed after reading."""
    conn = await raw_connect(srv, headers, source=source)
    conn.drop()
    assert conn.status != 101, f"expected a refusal, got an upgrade: {conn.headers}"
    return conn


# --- metrics and waiting ------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of ``name{labels}`` in a Prometheus exposition, 0 when absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    pattern = re.compile(
        rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", re.MULTILINE
    )
    for found in pattern.finditer(text):
        got = ",".join(sorted(part for part in (found.group(1) or "").split(",") if part))
        if got == wanted:
            return float(found.group(2))
    return 0.0


async def read_metric(srv: RunningServer, name: str, **labels: str) -> float:
    return metric(await asyncio.to_thread(srv.metrics), name, **labels)


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     timeout: float = EVENT_TIMEOUT) -> None:
    """Poll ``check`` until it holds (for state only visible through /metrics)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


async def metric_reaches(srv: RunningServer, value: float, name: str, **labels: str) -> None:
    """Wait until ``name{labels}`` equals ``value``."""

    async def check() -> bool:
        return await read_metric(srv, name, **labels) == value

    await eventually(check, f"{name}{labels} == {value}")
