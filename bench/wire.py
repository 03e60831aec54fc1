"""A raw-socket WebSocket client that offers permessage-deflate and counts wire bytes.

picows cannot inflate, so the compression rows use this instead: an asyncio
``Protocol`` that writes the opening handshake itself (offering
``permessage-deflate; client_max_window_bits`` when asked), reads the 101's
``Sec-WebSocket-Extensions``, and parses the server's frames with
:class:`FrameReader`, which keeps each message's size on the wire (frame
headers included) beside its payload. Compressed messages (RSV1 set) are
inflated with :mod:`zlib` as RFC 7692 says, so a benchmark checks what it
received, not just how much. What the client sends goes out uncompressed
(RSV1 clear, which RFC 7692 allows on a compressing connection) and masked.

The parsing and framing are pure functions and classes, unit-tested without
sockets (``tests/unit/test_bench_wire.py``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

#: What the deflating clients offer, as a browser does.
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
#: RFC 7692 7.2.2: every compressed message ends with this, stripped on the wire.
TAIL = b"\x00\x00\xff\xff"
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class ProtocolError(RuntimeError):
    """The server broke RFC 6455 or RFC 7692 (or the handshake failed)."""


@dataclass(frozen=True)
class Message:
    """One complete message from the server.

    ``payload`` is inflated when ``compressed``; ``wire_bytes`` is every byte
    its frames took on the wire, headers included.
    """

    opcode: int
    payload: bytes
    compressed: bool
    wire_bytes: int


@dataclass(frozen=True)
class Deflate:
    """The negotiated permessage-deflate parameters that matter to the client."""

    server_no_context_takeover: bool
    server_max_window_bits: int

    @classmethod
    def parse(cls, header: str | None) -> Deflate | None:
        """The server's answer in ``Sec-WebSocket-Extensions``, or None when it declined."""
        if not header:
            return None
        for extension in header.split(","):
            name, *params = (part.strip() for part in extension.split(";"))
            if name.lower() != "permessage-deflate":
                continue
            no_takeover = False
            bits = 15
            for param in params:
                key, _, value = param.partition("=")
                key = key.strip().lower()
                if key == "server_no_context_takeover":
                    no_takeover = True
                elif key == "server_max_window_bits":
                    bits = int(value.strip().strip('"'))
            return cls(no_takeover, bits)
        return None


@dataclass
class FrameReader:
    """Server frames in, complete messages out (control frames are messages too).

    ``deflate``: the negotiated parameters, or None (then RSV1 is an error).
    """

    deflate: Deflate | None = None
    max_message: int = 16 * 1024 * 1024
    _buffer: bytearray = field(default_factory=bytearray)
    _parts: list[bytes] = field(default_factory=list)
    _opcode: int = 0
    _compressed: bool = False
    _wire: int = 0
    _inflater: Any = None  # zlib's decompressor, kept between messages with context takeover

    def feed(self, data: bytes) -> list[Message]:
        """Parse what has arrived; every message completed by it, in order."""
        self._buffer += data
        out: list[Message] = []
        buf = self._buffer
        while True:
            if len(buf) < 2:
                break
            first, second = buf[0], buf[1]
            if second & 0x80:
                raise ProtocolError("masked frame from the server")
            length = second & 0x7F
            offset = 2
            if length == 126:
                if len(buf) < 4:
                    break
                (length,) = struct.unpack_from("!H", buf, 2)
                offset = 4
            elif length == 127:
                if len(buf) < 10:
                    break
                (length,) = struct.unpack_from("!Q", buf, 2)
                offset = 10
            if length > self.max_message:
                raise ProtocolError(f"frame of {length} bytes")
            if len(buf) < offset + length:
                break
            payload = bytes(buf[offset:offset + length])
            del buf[:offset + length]
            message = self._frame(first, payload, offset + length)
            if message is not None:
                out.append(message)
        return out

    def _frame(self, first: int, payload: bytes, wire: int) -> Message | None:
        fin, rsv1, opcode = bool(first & 0x80), bool(first & 0x40), first & 0x0F
        if first & 0x30:
            raise ProtocolError("RSV2/RSV3 set")
        if opcode >= 0x8:
            if rsv1 or not fin:
                raise ProtocolError("compressed or fragmented control frame")
            return Message(opcode, payload, False, wire)
        if rsv1 and self.deflate is None:
            raise ProtocolError("RSV1 set without permessage-deflate")
        if opcode == OP_CONT:
            if not self._parts:
                raise ProtocolError("continuation frame with no message")
            if rsv1:
                raise ProtocolError("RSV1 on a continuation frame")
        else:
            if self._parts:
                raise ProtocolError("new message inside a fragmented one")
            self._opcode, self._compressed, self._wire = opcode, rsv1, 0
        self._parts.append(payload)
        self._wire += wire
        if not fin:
            return None
        data = b"".join(self._parts)
        self._parts = []
        if self._compressed:
            data = self._inflate(data)
        return Message(self._opcode, data, self._compressed, self._wire)

    def _inflate(self, data: bytes) -> bytes:
        assert self.deflate is not None
        inflater = self._inflater
        if inflater is None or self.deflate.server_no_context_takeover:
            inflater = zlib.decompressobj(-self.deflate.server_max_window_bits)
            self._inflater = inflater
        out = inflater.decompress(data + TAIL, self.max_message + 1)
        if len(out) > self.max_message:
            raise ProtocolError("inflated message too large")
        return out


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final client frame, masked (RFC 6455 5.3), uncompressed."""
    mask = os.urandom(4) if mask is None else mask
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    if payload:
        key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
        masked = (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")
    else:
        masked = b""
    return header + mask + masked


def handshake_request(
    url: str, headers: Mapping[str, str], offer_deflate: bool
) -> tuple[bytes, str]:
    """The opening handshake's bytes, and the ``Sec-WebSocket-Key`` it carries."""
    parts = urlsplit(url)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {parts.path or '/'} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if offer_deflate:
        lines.append(f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


def accept_for(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and headers (names lower-cased) of an HTTP response head."""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(status_line.split(" ", 2)[1])
    except (IndexError, ValueError):
        raise ProtocolError(f"bad status line {status_line!r}") from None
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


class WireClient(asyncio.Protocol):
    """One connection; ``on_message`` gets every data message after the handshake.

    ``opened`` resolves with the 101's headers; pings are answered, a close is
    echoed and recorded in ``close_code``; ``received_wire_bytes`` counts every
    byte read after the 101.
    """

    def __init__(self, on_message: Callable[[WireClient, Message], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[dict[str, str]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.reader: FrameReader | None = None
        self.deflate: Deflate | None = None
        self.close_code: int | None = None
        self.received_wire_bytes = 0
        self._head = bytearray()
        self._request = b""
        self._key = ""
        self._on_message = on_message

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, rest = bytes(self._head[:end]), bytes(self._head[end + 4:])
            self._head.clear()
            try:
                status, headers = parse_response_head(head)
                if status != 101:
                    raise ProtocolError(f"handshake answered {status}")
                if headers.get("sec-websocket-accept") != accept_for(self._key):
                    raise ProtocolError("wrong Sec-WebSocket-Accept")
                self.deflate = Deflate.parse(headers.get("sec-websocket-extensions"))
            except ProtocolError as exc:
                self._fail(exc)
                return
            self.reader = FrameReader(self.deflate)
            self.opened.set_result(headers)
            data = rest
            if not data:
                return
        self.received_wire_bytes += len(data)
        try:
            messages = self.reader.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        for message in messages:
            self._dispatch(message)

    def _dispatch(self, message: Message) -> None:
        if message.opcode == OP_PING:
            self.send(OP_PONG, message.payload)
        elif message.opcode == OP_CLOSE:
            if self.close_code is None and len(message.payload) >= 2:
                self.close_code = int.from_bytes(message.payload[:2], "big")
            self.send(OP_CLOSE, message.payload[:2])
            assert self.transport is not None
            self.transport.close()
        elif message.opcode in (OP_TEXT, OP_BINARY) and self._on_message is not None:
            self._on_message(self, message)

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        assert self.transport is not None
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the 101: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(opcode, payload))

    def send_text(self, payload: bytes) -> None:
        self.send(OP_TEXT, payload)

    async def close(self, timeout: float = 5.0) -> None:
        """Send a 1000 close and wait for the connection to end (aborting after ``timeout``)."""
        if self.transport is None or self.closed.done():
            return
        self.send(OP_CLOSE, (1000).to_bytes(2, "big"))
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            self.transport.abort()


async def connect(
    url: str,
    headers: Mapping[str, str],
    *,
    offer_deflate: bool,
    on_message: Callable[[WireClient, Message], None] | None = None,
    local_addr: tuple[str, int] | None = None,
    cafile: str | None = None,
    timeout: float = 30.0,
) -> WireClient:
    """A :class:`WireClient` whose handshake is done."""
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    context = ssl.create_default_context(cafile=cafile) if secure else None
    port = parts.port or (443 if secure else 80)
    client = WireClient(on_message)
    client._request, client._key = handshake_request(url, headers, offer_deflate)
    loop = asyncio.get_running_loop()
    await loop.create_connection(
        lambda: client, parts.hostname, port, ssl=context, local_addr=local_addr
    )
    await asyncio.wait_for(asyncio.shield(client.opened), timeout)
    return client
