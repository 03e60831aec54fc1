"""A raw RFC 6455 client, for what well-behaved libraries refuse to do.

It reads the exact HTTP answer to a refused handshake (status and
``Retry-After``), pipelines requests or frames right behind the handshake,
sends broken frames, stops reading, or vanishes without a close frame.
Frames are built by :func:`client_frame` (also the frame parser's unit
tests' input). A *target* is a port on 127.0.0.1, ``"host:port"``, or
anything with a ``port`` (``RunningServer``).

Every connection is tracked like the clients (:func:`tests.support.clients.track`)
and closed when the test's loop ends.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import struct
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, Protocol

from tests.support.clients import WAIT, token_user, track
from tests.support.tokens import bearer

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA


class HasPort(Protocol):
    @property
    def port(self) -> int: ...


RawTarget = int | str | HasPort


def address_of(target: RawTarget) -> tuple[str, int]:
    """``(host, port)`` of a port on 127.0.0.1, ``"host:port"``, or a server."""
    if isinstance(target, int):
        return "127.0.0.1", target
    if isinstance(target, str):
        host, port = target.rsplit(":", 1)
        return host, int(port)
    return "127.0.0.1", target.port


# --- frames --------------------------------------------------------------------------


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    mask: bytes | None = None,
) -> bytes:
    """A client frame as a browser sends it (final, masked), or broken on purpose.

    Args:
        rsv: reserved bits to set (``0x40``...).
        masked: False for an unmasked frame (a protocol error from a client).
        length: the length to announce instead of the payload's.
        mask: the masking key (random unless given).
    """
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    if size < 126:
        header = bytes((first, mask_bit | size))
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return header + payload
    key = os.urandom(4) if mask is None else mask
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    """The payload of a close frame (RFC 6455 section 5.5.1)."""
    return struct.pack("!H", code) + reason


def text_frame(message: dict[str, Any] | str) -> bytes:
    """A client text frame carrying ``message`` (a dict as JSON)."""
    text = message if isinstance(message, str) else json.dumps(message)
    return client_frame(OP_TEXT, text.encode())


def close_frame(code: int = 1000) -> bytes:
    return client_frame(OP_CLOSE, close_payload(code))


def upgrade_request(headers: dict[str, str] | None = None, *, path: str = "/ws",
                    version: str = "HTTP/1.1") -> bytes:
    """The bytes of a WebSocket upgrade request (RFC 6455 section 4.1)."""
    lines = [
        f"GET {path} {version}",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Frame(NamedTuple):
    """One frame from the server (never masked, RFC 6455 section 5.1); a tuple
    ``(opcode, payload)``."""

    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        assert self.opcode == OP_CLOSE
        if len(self.payload) < 2:
            return None
        code: int = struct.unpack(">H", self.payload[:2])[0]
        return code

    def json(self) -> dict[str, Any]:
        assert self.opcode == OP_TEXT, self
        decoded: dict[str, Any] = json.loads(self.payload)
        return decoded


# --- the connection ------------------------------------------------------------------


@dataclass
class RawConnection:
    """A TCP connection to the server; after :meth:`read_head`, the HTTP answer's
    ``status`` and (lower-cased) ``headers``."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    #: Whether the last frame read had RSV1 set (a compressed message, RFC 7692).
    last_rsv1: bool = False

    @classmethod
    async def open(cls, target: RawTarget, data: bytes = b"", *, source: str = "127.0.0.1",
                   rcvbuf: int | None = None, tls: ssl.SSLContext | None = None,
                   ) -> RawConnection:
        """Connect from ``source`` (any 127.0.0.0/8 address reaches the server and
        counts as another client) and send ``data``; nothing is read yet.

        ``rcvbuf``: SO_RCVBUF set before connecting (a small window for a
        client that will stop reading). ``tls``: speak TLS with this context.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((source, 0))
        try:
            await asyncio.get_running_loop().sock_connect(sock, address_of(target))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=tls, server_hostname="localhost" if tls is not None else None
        )
        conn = cls(reader, writer)
        track(conn)
        if data:
            await conn.send(data)
        return conn

    async def read_head(self, timeout: float = WAIT) -> tuple[int, dict[str, str]]:
        """The status and headers of the next HTTP answer (also kept on ``self``)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                self.headers[name.strip().lower()] = value.strip()
        return self.status, self.headers

    async def read_frame(self, timeout: float = WAIT) -> Frame:
        """The next frame; raises ``asyncio.IncompleteReadError`` at EOF."""
        return await asyncio.wait_for(self._read_frame(), timeout)

    async def _read_frame(self) -> Frame:
        first, second = await self.reader.readexactly(2)
        self.last_rsv1 = bool(first & 0x40)
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

    async def wait_eof(self, timeout: float = WAIT) -> bytes:
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

    def data_segments_received(self) -> int | None:
        """TCP segments with data received so far (Linux 4.6+'s
        ``tcpi_data_segs_in``), or None where ``TCP_INFO`` does not say: what
        a server wrote in one ``send`` arrives in one segment on loopback."""
        tcp_info = getattr(socket, "TCP_INFO", None)
        if tcp_info is None:
            return None
        info = self.writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, tcp_info, 256)
        if len(info) < 160:
            return None
        return int(struct.unpack_from("I", info, 152)[0])

    def drop(self) -> None:
        """Close the socket without a close frame (a FIN)."""
        self.writer.close()

    def reset(self) -> None:
        """Vanish abruptly: the kernel sends an RST (SO_LINGER with a zero timeout)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def discard(self) -> None:
        """Close the socket now, whatever state it is in."""
        self.writer.transport.abort()

    async def __aenter__(self) -> RawConnection:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        self.discard()


async def raw_connect(
    target: RawTarget,
    headers: dict[str, str] | None = None,
    *,
    path: str = "/ws",
    source: str = "127.0.0.1",
    pipelined: bytes = b"",
    rcvbuf: int | None = None,
    tls: ssl.SSLContext | None = None,
) -> RawConnection:
    """Send an upgrade request (``headers`` added: the token, proxy headers) and
    ``pipelined`` bytes in the same write; read the HTTP answer's head."""
    conn = await RawConnection.open(
        target, upgrade_request(headers, path=path) + pipelined, source=source, rcvbuf=rcvbuf,
        tls=tls,
    )
    await conn.read_head()
    return conn


async def upgraded(target: RawTarget, headers: dict[str, str] | None = None,
                   **kw: Any) -> RawConnection:
    """:func:`raw_connect` that must be answered 101."""
    conn = await raw_connect(target, headers, **kw)
    assert conn.status == 101, (conn.status, conn.headers)
    return conn


async def raw_welcomed(target: RawTarget, tok: str, *, source: str = "127.0.0.1",
                       headers: dict[str, str] | None = None) -> RawConnection:
    """A raw connection with ``tok`` upgraded and welcomed (the welcome is read)."""
    conn = await upgraded(target, {**bearer(tok), **(headers or {})}, source=source)
    welcome = await conn.read_json()
    assert welcome["type"] == "welcome", welcome
    assert welcome["user"] == token_user(tok), welcome
    return conn


async def raw_refused(target: RawTarget, headers: dict[str, str] | None = None, *,
                      source: str = "127.0.0.1") -> RawConnection:
    """A handshake expected to be refused before the upgrade; closed after reading."""
    conn = await raw_connect(target, headers, source=source)
    conn.drop()
    assert conn.status != 101, f"expected a refusal, got an upgrade: {conn.headers}"
    return conn
