"""RFC 6455 frames without I/O: the server's parser for client frames, and builders.

:class:`FrameParser` takes bytes as they come off the socket and returns what
they mean: a complete text message (``str``), a complete binary message
(``bytes``), :class:`Ping`, :class:`Pong`, :class:`Close`, or a
:class:`Failure` carrying the close code the server must send. It does no I/O
and keeps no timer; the caller (``wsserver.connection.ServerConnection``) answers
pings and closes, and the I/O layer arms the fragment timer from
:attr:`FrameParser.fragment_started`. With permessage-deflate negotiated it
inflates compressed messages (RSV1), bounded by the message size limit
(:class:`wsserver.deflate.Inflater`).

Messages are returned as the plain ``str``/``bytes`` objects themselves, so the
common case allocates nothing beyond the payload.

Unmasking runs in C when a well-kept library offers it: ``websockets.speedups``
(fastest measured here), else ``tornado.speedups``, else a pure-Python XOR on
big integers.
"""

from __future__ import annotations

import codecs
import struct
import time
from collections.abc import Callable

from wsserver.closecodes import CloseCode, valid_on_wire
from wsserver.deflate import InflateError, Inflater, compressor_encoding
from wsserver.ratelimit import Clock, TokenBucket

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_FIN = 0x80
_RSV = 0x70
#: RFC 7692 section 6: RSV1 marks the first frame of a compressed message.
_RSV1 = 0x40
_MASKED = 0x80
#: RFC 6455 section 5.5: control frames carry at most 125 bytes.
MAX_CONTROL_PAYLOAD = 125


def _mask_python(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``mask`` (RFC 6455 section 5.3)."""
    length = len(data)
    key = int.from_bytes((mask * ((length >> 2) + 1))[:length], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(length, "little")


def _load_mask() -> Callable[[bytes, bytes], bytes]:
    try:
        from websockets.speedups import apply_mask
    except ImportError:
        pass
    else:
        return apply_mask
    try:
        from tornado.speedups import websocket_mask
    except ImportError:
        return _mask_python
    return lambda data, mask: websocket_mask(mask, data)


#: ``unmask(data, mask)``: the fastest implementation available here (called
#: directly, without a wrapper, when it is websockets' C one).
unmask: Callable[[bytes, bytes], bytes] = _load_mask()


class Ping:
    """A ping arrived; answer it with :func:`pong_frame` of the same payload."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Ping({self.data!r})"


class Pong:
    """A pong arrived."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Pong({self.data!r})"


class Close:
    """The peer's close frame: 1005 when it carried no code (RFC 6455 section 7.1.5)."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"Close({self.code}, {self.reason!r})"


class Failure:
    """The peer broke the protocol or a limit; close with ``code`` (section 7.1.7)."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"Failure({self.code}, {self.reason!r})"


Event = str | bytes | Ping | Pong | Close | Failure

_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class FrameParser:
    """Parses one connection's client-to-server frames (RFC 6455 section 5).

    Args:
        max_message_size: bytes a message may carry, all its fragments together
            (1009 beyond, as soon as a frame header announces more).
        frame_budget: every complete frame, control and continuation frames
            included, takes one token; an empty bucket is a flood (1008).
        fragment_timeout: seconds a fragmented message may stay unfinished
            (1008 when a later frame arrives too late; the caller's timer covers
            a peer that goes silent, see :meth:`fragment_expired`).
        clock: monotonic seconds, injected for tests.
        inflater: set when permessage-deflate was negotiated: a message whose
            first frame has RSV1 set is inflated, and counts against
            ``max_message_size`` after inflation (1009 as soon as it passes,
            without inflating the rest). Without it RSV1 fails with 1002.

    After it has returned a :class:`Close` or a :class:`Failure`, the parser
    ignores everything fed to it (RFC 6455 section 5.5.1: nothing follows a close).
    """

    __slots__ = (
        "_budget",
        "_chunks",
        "_clock",
        "_frag_compressed",
        "_frag_decoder",
        "_frag_opcode",
        "_frag_parts",
        "_frag_size",
        "_frag_text",
        "_have",
        "_inflater",
        "_max_size",
        "_need",
        "_pv_decoder",
        "_pv_done",
        "_pv_mask",
        "_pv_wait",
        "_timeout",
        "done",
        "fragment_started",
    )

    def __init__(
        self,
        max_message_size: int,
        frame_budget: TokenBucket | None = None,
        fragment_timeout: float | None = None,
        clock: Clock = time.monotonic,
        inflater: Inflater | None = None,
    ) -> None:
        self._max_size = max_message_size
        self._inflater = inflater
        self._budget = frame_budget
        self._timeout = fragment_timeout
        self._clock = clock
        # Bytes kept from earlier feeds (a frame not complete yet), joined once
        # there are enough: a large message arriving in many reads is copied
        # O(size) times in total, not O(size**2).
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 2
        # The fragmented message in progress (opcode 0: none).
        self._frag_opcode = 0
        self._frag_parts: list[bytes] = []
        self._frag_text: list[str] = []
        self._frag_size = 0
        self._frag_decoder: codecs.IncrementalDecoder | None = None
        self._frag_compressed = False
        # Validation of a text frame's payload before the frame is complete,
        # so that invalid UTF-8 fails fast (Autobahn 6.4.x).
        self._pv_decoder: codecs.IncrementalDecoder | None = None
        self._pv_done = 0
        self._pv_mask = b""
        #: Bytes of an unfinished text frame, counted from its first, once its
        #: header is in (validation cannot start before: the mask is in it).
        self._pv_wait = 0
        #: True once a Close or a Failure has been returned.
        self.done = False
        #: ``clock()`` when the unfinished fragmented message began, else None.
        self.fragment_started: float | None = None

    def fragment_expired(self, now: float) -> bool:
        """True when a fragmented message has been unfinished too long at ``now``."""
        started = self.fragment_started
        return (
            started is not None
            and self._timeout is not None
            and now - started >= self._timeout
        )

    def _fail(self, events: list[Event], code: int, reason: str) -> list[Event]:
        self.done = True
        self._chunks = []
        self._frag_parts = []
        self._frag_text = []
        self.fragment_started = None
        events.append(Failure(code, reason))
        return events

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data`` (the next bytes read); returns the events it completes."""
        if self.done or not data:
            return []
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                if self._pv_decoder is not None:
                    if not self._validate_partial(data):
                        return self._fail([], CloseCode.INVALID_DATA, "invalid UTF-8 in text")
                    return []
                if not self._pv_wait or self._have < self._pv_wait:
                    return []
                # A text frame's header is complete now (it came in pieces,
                # as TLS records may cut it): parse again, which starts
                # validating its payload so far.
            data = b"".join(self._chunks)
            self._chunks = []
        elif len(data) < self._need:
            self._chunks.append(data)
            self._have = len(data)
            return []

        events: list[Event] = []
        pos = 0
        end = len(data)
        max_size = self._max_size
        need = 2
        while end - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            if length < 126:
                header = 6
            elif length == 126:
                header = 8
                if end - pos < 4:
                    need = 4
                    self._pv_wait = self._text_header(b0, 8)
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
            else:
                header = 14
                if end - pos < 10:
                    need = 10
                    self._pv_wait = self._text_header(b0, 14)
                    break
                (length,) = struct.unpack_from("!Q", data, pos + 2)
                if length >> 63:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "bad frame length")
            # Every header check runs before waiting for the payload, so a
            # bad or oversized frame fails before its bytes are buffered.
            if not b1 & _MASKED:
                return self._fail(events, CloseCode.PROTOCOL_ERROR, "client frames must be masked")
            opcode = b0 & 0x0F
            fin = b0 & _FIN
            compressed = b0 & _RSV
            if compressed and (
                compressed != _RSV1 or self._inflater is None or not OP_TEXT <= opcode <= OP_BINARY
            ):
                return self._fail(events, CloseCode.PROTOCOL_ERROR, "RSV bits set, no extension")
            if opcode & 0x8:
                if opcode > OP_PONG:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "unknown opcode")
                if not fin:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "fragmented control frame")
                if length > MAX_CONTROL_PAYLOAD:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "control frame too long")
            elif opcode == OP_CONTINUATION:
                if not self._frag_opcode:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "nothing to continue")
                # A compressed message is counted as it inflates (below).
                if (length if self._frag_compressed else self._frag_size + length) > max_size:
                    return self._fail(events, CloseCode.TOO_BIG, "message too big")
            elif opcode <= OP_BINARY:
                if self._frag_opcode:
                    return self._fail(
                        events, CloseCode.PROTOCOL_ERROR, "expected a continuation frame"
                    )
                if length > max_size:
                    return self._fail(events, CloseCode.TOO_BIG, "message too big")
            else:
                return self._fail(events, CloseCode.PROTOCOL_ERROR, "unknown opcode")

            stop = pos + header + length
            if stop > end:
                need = header + length
                text = opcode == OP_TEXT or (opcode == OP_CONTINUATION and self._frag_opcode == 1)
                # Compressed bytes are validated once inflated, not here.
                if compressed or (opcode == OP_CONTINUATION and self._frag_compressed):
                    text = False
                if text and end >= pos + header:
                    self._pv_wait = 0
                    if not self._start_partial(data, pos + header, end):
                        return self._fail(events, CloseCode.INVALID_DATA, "invalid UTF-8 in text")
                else:
                    # Validation starts once the header (and its mask) is in.
                    self._pv_wait = header if text else 0
                break
            self._pv_decoder = None
            self._pv_wait = 0
            budget = self._budget
            if budget is not None and budget.take():
                return self._fail(events, CloseCode.POLICY, "too many frames")
            if self.fragment_started is not None and self.fragment_expired(self._clock()):
                return self._fail(events, CloseCode.POLICY, "fragmented message not finished")
            if length:
                payload = unmask(data[pos + header : stop], data[pos + header - 4 : pos + header])
            else:
                payload = b""
            pos = stop
            if compressed or (opcode == OP_CONTINUATION and self._frag_compressed):
                limit = max_size - self._frag_size if opcode == OP_CONTINUATION else max_size
                inflated = self._inflate(payload, bool(fin), limit)
                if type(inflated) is Failure:
                    return self._fail(events, inflated.code, inflated.reason)
                payload = inflated  # type: ignore[assignment]
                length = len(payload)

            if opcode == OP_TEXT:
                if fin:
                    try:
                        events.append(payload.decode("utf-8"))
                    except UnicodeDecodeError:
                        return self._fail(events, CloseCode.INVALID_DATA, "invalid UTF-8 in text")
                else:
                    decoder = self._frag_decoder = _utf8_decoder()
                    try:
                        self._frag_text = [decoder.decode(payload, False)]
                    except UnicodeDecodeError:
                        return self._fail(events, CloseCode.INVALID_DATA, "invalid UTF-8 in text")
                    self._begin_fragments(OP_TEXT, length, compressed)
            elif opcode == OP_BINARY:
                if fin:
                    events.append(payload)
                else:
                    self._frag_parts = [payload]
                    self._begin_fragments(OP_BINARY, length, compressed)
            elif opcode == OP_CONTINUATION:
                self._frag_size += length
                if self._frag_opcode == OP_TEXT:
                    assert self._frag_decoder is not None
                    try:
                        part = self._frag_decoder.decode(payload, bool(fin))
                    except UnicodeDecodeError:
                        return self._fail(events, CloseCode.INVALID_DATA, "invalid UTF-8 in text")
                    self._frag_text.append(part)
                    if fin:
                        events.append("".join(self._frag_text))
                else:
                    self._frag_parts.append(payload)
                    if fin:
                        events.append(b"".join(self._frag_parts))
                if fin:
                    self._frag_opcode = 0
                    self._frag_compressed = False
                    self._frag_parts = []
                    self._frag_text = []
                    self._frag_decoder = None
                    self.fragment_started = None
            elif opcode == OP_PING:
                events.append(Ping(payload))
            elif opcode == OP_PONG:
                events.append(Pong(payload))
            else:
                close = parse_close(payload)
                self.done = True
                self._chunks = []
                events.append(close)
                return events

        if pos < end:
            rest = data[pos:] if pos else data
            self._chunks = [rest]
            self._have = end - pos
        else:
            self._have = 0
        self._need = need
        return events

    def _begin_fragments(self, opcode: int, length: int, compressed: int) -> None:
        self._frag_opcode = opcode
        self._frag_size = length
        self._frag_compressed = bool(compressed)
        self.fragment_started = self._clock()

    def _inflate(self, payload: bytes, fin: bool, limit: int) -> bytes | Failure:
        """A compressed frame's payload, inflated to at most ``limit`` bytes."""
        assert self._inflater is not None
        try:
            inflated = self._inflater.inflate(payload, fin, limit)
        except InflateError:
            return Failure(CloseCode.INVALID_DATA, "invalid compressed data")
        if inflated is None:
            return Failure(CloseCode.TOO_BIG, "message too big")
        return inflated

    def _text_header(self, b0: int, header: int) -> int:
        """``header`` when the frame starting with ``b0`` is (part of) a text
        message to validate as it comes, else 0."""
        opcode = b0 & 0x0F
        if b0 & _RSV or (opcode == OP_CONTINUATION and self._frag_compressed):
            return 0
        text = opcode == OP_TEXT or (opcode == OP_CONTINUATION and self._frag_opcode == OP_TEXT)
        return header if text else 0

    def _start_partial(self, data: bytes, start: int, end: int) -> bool:
        """Validate the UTF-8 of an incomplete text frame's payload so far."""
        if self._pv_decoder is None:
            decoder = _utf8_decoder()
            if self._frag_opcode == OP_TEXT and self._frag_decoder is not None:
                decoder.setstate(self._frag_decoder.getstate())
            self._pv_decoder = decoder
            self._pv_done = 0
            self._pv_mask = data[start - 4 : start]
        return self._validate_partial(data[start + self._pv_done : end])

    def _validate_partial(self, chunk: bytes) -> bool:
        """Validate ``chunk``, the next bytes of the incomplete text frame's payload."""
        assert self._pv_decoder is not None
        if not chunk:
            return True
        shift = self._pv_done & 3
        mask = self._pv_mask[shift:] + self._pv_mask[:shift]
        self._pv_done += len(chunk)
        try:
            self._pv_decoder.decode(unmask(chunk, mask), False)
        except UnicodeDecodeError:
            return False
        return True


def parse_close(payload: bytes) -> Close | Failure:
    """The meaning of a close frame's payload (RFC 6455 sections 5.5.1 and 7.4)."""
    if not payload:
        return Close(1005, "")
    if len(payload) == 1:
        return Failure(CloseCode.PROTOCOL_ERROR, "close frame of one byte")
    code = (payload[0] << 8) | payload[1]
    if not valid_on_wire(code):
        return Failure(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return Failure(CloseCode.INVALID_DATA, "invalid UTF-8 in close reason")
    return Close(code, reason)


# ------------------------------------------------------------------ builders


def build_frame(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    """A final, unmasked server frame (RFC 6455 section 5.2; servers do not mask).

    ``rsv1`` marks a compressed message (RFC 7692 section 6).
    """
    length = len(payload)
    first = _FIN | _RSV1 | opcode if rsv1 else _FIN | opcode
    if length < 126:
        return bytes((first, length)) + payload
    if length <= 0xFFFF:
        return struct.pack("!BBH", first, 126, length) + payload
    return struct.pack("!BBQ", first, 127, length) + payload


def text_frame(text: str) -> bytes:
    """A text message frame."""
    return build_frame(OP_TEXT, text.encode("utf-8"))


def text_message(payload: bytes) -> bytes:
    """The text frame carrying ``payload``, UTF-8 already: a server message's
    WebSocket encoding (a :data:`wsserver.transport.Encoding`). Without
    compression it is the same bytes for every recipient (servers do not
    mask, RFC 6455 section 5.1), so a broadcast builds it once."""
    return build_frame(OP_TEXT, payload)


def _compressed_text(data: bytes) -> bytes:
    return build_frame(OP_TEXT, data, True)


def _compressed_binary(data: bytes) -> bytes:
    return build_frame(OP_BINARY, data, True)


#: The compressed text frame of a message, one encoding per server window
#: (``server_max_window_bits``, 8 to 15), each a :data:`wsserver.transport.Encoding`:
#: built once per message and window, the same bytes for every member that
#: negotiated that window (the server keeps no context between messages).
DEFLATED_TEXT = {bits: compressor_encoding(bits, _compressed_text) for bits in range(8, 16)}
#: The same for binary messages (the conformance echo server's).
DEFLATED_BINARY = {bits: compressor_encoding(bits, _compressed_binary) for bits in range(8, 16)}
#: The compressed text frame with the default window, which browsers negotiate.
deflated_text_message = DEFLATED_TEXT[15]


def binary_frame(data: bytes) -> bytes:
    """A binary message frame."""
    return build_frame(OP_BINARY, data)


def pong_frame(data: bytes) -> bytes:
    """The answer to a ping carrying ``data`` (RFC 6455 section 5.5.3)."""
    return build_frame(OP_PONG, data)


def ping_frame(data: bytes = b"") -> bytes:
    """A ping carrying ``data`` (at most 125 bytes)."""
    return build_frame(OP_PING, data)


#: An empty ping (RFC 6455 section 5.5.2): the keepalive, the same bytes for every peer.
PING = ping_frame()


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A close frame; ``code`` None sends none (then ``reason`` must be empty).

    The reason is cut to fit the 125-byte limit on a UTF-8 character boundary.
    """
    if code is None:
        return build_frame(OP_CLOSE, b"")
    encoded = reason.encode("utf-8")
    if len(encoded) > MAX_CONTROL_PAYLOAD - 2:
        encoded = encoded[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode("utf-8")
    return build_frame(OP_CLOSE, struct.pack("!H", code) + encoded)
