"""The fast frame path: after the 101, the socket leaves Tornado for an asyncio.Protocol.

Tornado's ``IOStream`` costs a future per read and buffer bookkeeping per
write. Here Tornado still parses the HTTP upgrade and runs the handler's checks;
:class:`FastProtocol` (what ``WebSocketHandler.get_websocket_protocol()``
returns) answers the 101 as Tornado's ``WebSocketProtocol13`` does, then takes
the socket away from the ``IOStream`` and drives it from a
:class:`FrameConnection`: ``data_received`` parses every complete frame of a
read with :class:`wsserver.framing.FrameParser`, and what one step of the loop
sends a connection goes to the asyncio transport in one write: the replies to
a read at its end, other frames (fan-out, pings) right after the step.

Plain TCP only: a TLS connection keeps Tornado's path (``handler`` chooses with
``tornado_internals.is_tls``), since its socket cannot leave the ``SSLIOStream``
without its TLS state. Works on any asyncio loop; uvloop's is faster and is used
when the process installs it (``wsserver``'s CLI does not, yet).

The handler's ``open()`` runs after the 101, with ``ws_connection.transport``
ready; it sets ``transport.receiver`` to accept the connection. Frames are read
only after ``open()`` returned and only when a receiver is set: a refused
connection (``open()`` called ``transport.close(4001, ...)`` and set no
receiver) has its pipelined frames dropped unread and its TCP connection closed
as soon as the close frame is flushed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import tornado.escape
import tornado.websocket
from tornado.concurrent import Future
from tornado.httputil import HTTPHeaders

from wsserver import framing
from wsserver.closecodes import CloseCode
from wsserver.config import Settings
from wsserver.edge.tornado_internals import (
    ServerProtocol13,
    finish_unwritten,
    is_tls,
    take_socket,
    websocket_params,
)
from wsserver.framing import Close, Failure, FrameParser, Ping, Pong
from wsserver.ratelimit import TokenBucket
from wsserver.transport import Prepared, Receiver, TimerHandle

log = logging.getLogger("wsserver.fastpath")

#: RFC 6455 section 4.2.2: the GUID appended to the client's key.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass(frozen=True)
class FrameLimits:
    """What one connection's frames may do (from ``Settings``)."""

    max_message_size: int = 65536
    #: Frames per second, every kind counted; None: no budget.
    frame_rate: float | None = 200.0
    frame_burst: int = 400
    #: Seconds a fragmented message may stay unfinished; None: no bound.
    fragment_timeout: float | None = 10.0
    #: Seconds to wait for the peer's close frame after the server's.
    close_timeout: float = 2.0
    #: Unsent bytes past which a ping is not answered (None: always answered).
    max_write_buffer: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> FrameLimits:
        """The limits ``settings`` asks for."""
        rate, burst = settings.frame_budget
        return cls(
            max_message_size=settings.max_message_size,
            frame_rate=rate,
            frame_burst=burst,
            fragment_timeout=settings.fragment_timeout,
            max_write_buffer=settings.max_write_buffer,
        )

    def parser(self) -> FrameParser:
        """A fresh parser holding these limits."""
        budget = None
        if self.frame_rate is not None:
            budget = TokenBucket(self.frame_rate, self.frame_burst)
        return FrameParser(self.max_message_size, budget, self.fragment_timeout)


#: Bytes read per ``recv_into``. asyncio's plain ``Protocol`` reads with
#: ``recv(256 KiB)``, allocating (and, past malloc's mmap threshold, mapping)
#: 256 KiB per read; measured here that was 40% of an echo's time.
READ_BUFFER = 65536
_buffers = threading.local()


def _read_buffer() -> memoryview:
    """The read buffer every connection of this thread's loop shares.

    asyncio calls ``get_buffer``, ``recv_into`` and ``buffer_updated`` in one
    synchronous step, and :meth:`FrameConnection.buffer_updated` copies the
    bytes out at once, so one buffer can serve every connection: an idle
    connection then costs no 64 KiB of its own.
    """
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(READ_BUFFER))
    return view


class _Flusher:
    """Writes out, once per turn of the loop, what each connection was sent.

    A broadcast hands every member its frame at once; a member sent several
    frames in one step (a read's worth of publishes served together) gets them
    in one ``write``, hence one ``send`` system call, which is most of what a
    delivery costs. The flush runs as the loop's next callback, so nothing
    waits for more than the rest of the current step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._dirty: list[FrameConnection] = []

    def add(self, connection: FrameConnection) -> None:
        if not self._dirty:
            self.loop.call_soon(self._run)
        self._dirty.append(connection)

    def _run(self) -> None:
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            try:
                connection._flush_batch()
            except Exception:
                log.exception("write failed; aborting the connection")
                connection.abort()


def _flusher(loop: asyncio.AbstractEventLoop) -> _Flusher:
    """This thread's flusher, for ``loop`` (tests run one loop after another)."""
    flusher: _Flusher | None = getattr(_buffers, "flusher", None)
    if flusher is None or flusher.loop is not loop:
        flusher = _buffers.flusher = _Flusher(loop)
    return flusher


class FrameConnection(asyncio.BufferedProtocol):
    """One WebSocket connection after the 101: a ``wsserver.transport.Transport``.

    The only place, with Tornado's path for TLS, where messages become frames.

    ``receiver`` gets the messages; ``on_gone`` (optional) is called once after
    ``receiver.on_closed``, for whoever must forget the connection too.
    """

    kind = "websocket"

    def __init__(
        self,
        limits: FrameLimits,
        unsent: bytes = b"",
        on_gone: Callable[[int, str], None] | None = None,
    ) -> None:
        self.receiver: Receiver | None = None
        self.limits = limits
        self._parser = limits.parser()
        self._unsent = unsent
        self._on_gone = on_gone
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        #: True once open() returned (see start()).
        self._started = False
        self._pipelined = b""
        #: True once our side has ended (see _cut_after_flush): input is dropped.
        self._discarding = False
        # Frames not yet written: those sent while a read is processed are
        # written at its end; the others by the flusher, after this step.
        self._batch: list[bytes] | None = None
        self._batch_size = 0
        self._reading = False
        self._flusher = _flusher(self._loop)
        # (code, reason) of the first close frame each way.
        self._sent_close: tuple[int, str] | None = None
        self._got_close: tuple[int, str] | None = None
        self._server_first = False
        self._aborted_by_server = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._fragment_timer: asyncio.TimerHandle | None = None
        self._read_view = _read_buffer()
        self._gone = False
        #: True while the receiver asked not to be handed messages (pause_reading).
        self._paused = False
        #: Events parsed but not handed over yet (the receiver paused meanwhile).
        self._held: list[framing.Event] = []
        #: True once either side sent a close frame, or the connection is gone.
        self.closing = False

    # ------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if self._unsent:
            transport.write(self._unsent)
            self._unsent = b""
        self._flush_batch()  # what open() sent: the welcome, or a refusal's close
        if not self._started:
            # Only FastProtocol connects, after start(); a connection made
            # any other way has had no open() and cannot be served.
            log.error("connection made before start(); closing with 1011")
            self.close(CloseCode.INTERNAL, "")
            self._cut_after_flush()
            return
        if self.receiver is None:
            # A refused connection: nothing it sent is read, and it is cut as
            # soon as the close frame is out.
            self._pipelined = b""
            self._cut_after_flush()
            return
        if self.closing:
            # open() closed but kept its receiver: wait for the peer's close.
            self._close_timer = self._loop.call_later(self.limits.close_timeout, self.abort)
        if self._paused:
            transport.pause_reading()
        pending, self._pipelined = self._pipelined, b""
        if pending:
            self.data_received(pending)

    def start(self, pipelined: bytes) -> None:
        """Called once ``open()`` returned, before the socket is connected.

        ``pipelined`` (what the client sent behind its handshake) is read first
        once connected, and only when ``open()`` set a receiver.
        """
        self._started = True
        if self.receiver is None and not self.closing:
            log.error("open() set no receiver and did not close; closing with 1011")
            self.close(CloseCode.INTERNAL, "")
        self._pipelined = pipelined

    def abandon(self) -> None:
        """The socket never got connected: the connection is over (1006)."""
        self._aborted_by_server = self._sent_close is None and self._got_close is None
        self._transport_gone()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_view[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        """Parse ``data`` (the next bytes read) and act on every event in it."""
        if self._discarding:
            return  # our side has ended: what still comes is read and dropped
        events = self._parser.feed(data)
        if not events:
            self._arm_fragment_timer()
            return
        if self._paused or self._held:
            self._held.extend(events)  # read before the pause took effect
            return
        self._dispatch(events)
        self._arm_fragment_timer()

    def _dispatch(self, events: list[framing.Event]) -> None:
        """Act on ``events`` in order; those after a pause are held for resume_reading()."""
        receiver = self.receiver
        self._reading = True
        try:
            for index, event in enumerate(events):
                if self._paused:
                    self._held[:0] = events[index:]
                    break
                kind = type(event)
                if kind is str:
                    if not self.closing and receiver is not None:
                        receiver.on_text(event)  # type: ignore[arg-type]
                elif kind is bytes:
                    if not self.closing and receiver is not None:
                        receiver.on_binary(event)  # type: ignore[arg-type]
                elif kind is Ping:
                    # A peer that does not read its backlog gets no more pongs
                    # (RFC 6455 section 5.5.3 lets a pong answer only the latest
                    # ping): pings must not grow the backlog past the bound.
                    bound = self.limits.max_write_buffer
                    if bound is None or self.buffered() < bound:
                        self.send_frame(framing.pong_frame(event.data))  # type: ignore[union-attr]
                elif kind is Pong:
                    if not self.closing and receiver is not None:
                        receiver.on_pong(event.data)  # type: ignore[union-attr]
                elif kind is Close:
                    self._peer_closed(event)  # type: ignore[arg-type]
                else:
                    assert isinstance(event, Failure)
                    self._fail(event.code, event.reason)
        except Exception:
            log.exception("receiver failed; aborting the connection")
            self._batch = None
            self._batch_size = 0
            self.abort()
            return
        finally:
            self._reading = False
            self._flush_batch()

    def eof_received(self) -> bool | None:
        # The peer half-closed: nothing more will come, so close our side too.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport_gone()

    # ---------------------------------------------------- Transport protocol

    def send(self, message: Prepared) -> bool:
        """Queue one message as a text frame; False when closing (nothing sent)."""
        return self.send_frame(message.encoded(framing.text_message))

    def ping(self) -> None:
        """Send the keepalive ping; the peer's pong goes to ``receiver.on_pong``."""
        self.send_frame(framing.PING)

    def pause_reading(self) -> None:
        """Hand the receiver nothing more, and stop reading the socket, until
        :meth:`resume_reading`: the peer is slowed by TCP flow control."""
        if self._paused or self.closing:
            return
        self._paused = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_reading(self) -> None:
        """Hand over what was held back, in order, then read the socket again."""
        if not self._paused:
            return
        self._paused = False
        if self._reading:
            return  # called from inside a dispatch, which goes on with the rest
        while self._held and not self._paused:
            events, self._held = self._held, []
            self._dispatch(events)
        transport = self._transport
        if not self._paused and transport is not None and not transport.is_closing():
            transport.resume_reading()
        self._arm_fragment_timer()

    def send_frame(self, frame: bytes) -> bool:
        """Queue one complete server frame; False when closing (nothing sent)."""
        if self.closing:
            return False
        batch = self._batch
        if batch is None:
            batch = self._batch = []
            if not self._reading:
                self._flusher.add(self)
        batch.append(frame)
        self._batch_size += len(frame)
        return True

    def buffered(self) -> int:
        """Bytes accepted but not yet taken by the kernel."""
        transport = self._transport
        size = transport.get_write_buffer_size() if transport is not None else 0
        return size + self._batch_size

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; wait ``close_timeout`` for the peer's, then cut."""
        if self.closing:
            return
        self._send_close(code, reason)
        self._server_first = True
        if self._transport is not None:
            self._close_timer = self._loop.call_later(self.limits.close_timeout, self.abort)
        # Messages are dropped from now on; the peer's close frame must be read.
        self.resume_reading()
        # Not connected yet: connection_made decides (a refused connection is
        # cut at once).

    def abort(self) -> None:
        """Cut the TCP connection now."""
        if self._transport is not None and not self._gone:
            if self._sent_close is None and self._got_close is None:
                self._aborted_by_server = True
            self._transport.abort()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` after ``delay`` seconds on this connection's loop."""
        return self._loop.call_later(delay, callback)

    # -------------------------------------------------------------- internals

    def _flush_batch(self) -> None:
        batch = self._batch
        transport = self._transport
        if batch is None or transport is None:
            return  # not connected yet: connection_made writes the batch
        self._batch = None
        self._batch_size = 0
        if not self._gone:
            transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    def _send_close(self, code: int, reason: str) -> None:
        self.closing = True
        self._sent_close = (code, reason)
        # 1005 is never sent (RFC 6455 section 7.4.1): an empty close answers it.
        frame = framing.close_frame(None if code == 1005 else code, reason)
        transport = self._transport
        if transport is None:
            # Refused in open(): the close frame follows whatever open() sent.
            if self._batch is None:
                self._batch = []
            self._batch.append(frame)
            self._batch_size += len(frame)
            return
        self._flush_batch()
        if not transport.is_closing():
            transport.write(frame)

    def _peer_closed(self, close: Close) -> None:
        """RFC 6455 section 5.5.1: answer a close with a close, then close TCP."""
        self._got_close = (close.code, close.reason)
        if self._sent_close is None:
            self._send_close(close.code, "")
        # After its close frame the peer sends nothing more (section 5.5.1), so
        # no unread input can turn our close into a reset: close TCP now.
        self._cut_after_flush(linger=False)

    def _fail(self, code: int, reason: str) -> None:
        """Section 7.1.7: send the close frame, then drop the connection."""
        # DEBUG: the Session logs the close (one line per connection, throttled).
        log.debug("failing the connection with %d: %s", code, reason)
        if self._sent_close is None:
            self._send_close(code, reason)
            self._server_first = True
        self._cut_after_flush()

    def _cut_after_flush(self, *, linger: bool = True) -> None:
        """End our side once the close frame is out, without losing it.

        Closing a socket that still has unread input makes the kernel answer
        with a reset, which can destroy the close frame before the peer reads
        it (and with it the 4001 reason that tells a client to get a new
        token). So this is a lingering close: a FIN after what is buffered,
        input read and discarded until the peer's own FIN, and a hard cut
        after ``close_timeout`` for a peer that never ends.
        """
        transport = self._transport
        if transport is None or transport.is_closing() or (linger and self._discarding):
            return
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._close_timer = self._loop.call_later(self.limits.close_timeout, self.abort)
        if not linger:
            transport.pause_reading()
            transport.close()  # asyncio writes what is buffered first
        elif transport.can_write_eof():
            self._discarding = True
            transport.write_eof()  # after the buffered bytes, as asyncio does
        else:
            transport.close()

    def _arm_fragment_timer(self) -> None:
        started = self._parser.fragment_started
        if started is None or self._fragment_timer is not None or self.closing:
            return
        timeout = self.limits.fragment_timeout
        if timeout is None:
            return
        delay = max(0.0, started + timeout - self._loop.time())
        self._fragment_timer = self._loop.call_later(delay, self._fragment_timer_fired)

    def _fragment_timer_fired(self) -> None:
        self._fragment_timer = None
        if self.closing:
            return
        if self._parser.fragment_expired(self._loop.time()):
            self._fail(CloseCode.POLICY, "fragmented message not finished in time")
        else:
            self._arm_fragment_timer()

    def _transport_gone(self) -> None:
        if self._gone:
            return
        self._gone = True
        self.closing = True
        for timer in (self._close_timer, self._fragment_timer):
            if timer is not None:
                timer.cancel()
        self._close_timer = self._fragment_timer = None
        if self._server_first and self._sent_close is not None:
            code, reason, by_server = self._sent_close[0], self._sent_close[1], True
        elif self._got_close is not None:
            code, reason, by_server = self._got_close[0], self._got_close[1], False
        else:
            code, reason, by_server = 1006, "", self._aborted_by_server
        receiver = self.receiver
        self.receiver = None
        if receiver is not None:
            try:
                receiver.on_closed(code, reason, by_server)
            except Exception:
                log.exception("receiver.on_closed failed")
        on_gone, self._on_gone = self._on_gone, None
        if on_gone is not None:
            try:
                on_gone(code, reason)
            except Exception:
                log.exception("on_gone failed")


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _ACCEPT_GUID).digest()).decode()


class FastProtocol(tornado.websocket.WebSocketProtocol):
    """What ``get_websocket_protocol()`` returns to put a connection on the fast path.

    ``transport`` (a :class:`FrameConnection`) exists when ``open()`` runs.
    Tornado-style ``write_message``/``close`` keep working for code that uses
    them.
    """

    def __init__(self, handler: tornado.websocket.WebSocketHandler, limits: FrameLimits) -> None:
        super().__init__(handler)
        self.limits = limits
        self.transport: FrameConnection | None = None
        self._subprotocol: str | None = None

    async def accept_connection(self, handler: tornado.websocket.WebSocketHandler) -> None:
        headers = handler.request.headers
        key = headers.get("Sec-Websocket-Key")
        if not (headers.get("Host") and key and headers.get("Sec-Websocket-Version")):
            handler.set_status(400)
            handler.finish("Missing/Invalid WebSocket headers")
            return
        offered = [s.strip() for s in headers.get("Sec-WebSocket-Protocol", "").split(",")]
        offered = [s for s in offered if s]
        self._subprotocol = handler.select_subprotocol(offered)
        response = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Accept: " + accept_value(key),
        ]
        if self._subprotocol:
            assert self._subprotocol in offered
            response.append("Sec-WebSocket-Protocol: " + self._subprotocol)
        # No extension is negotiated: permessage-deflate stays off (RSV1 fails 1002).
        # The 101 goes out with open()'s first frames, in one write (see
        # connection_made); Tornado's finish() would send it alone.
        handler.set_status(101)
        stream = handler._detach_stream()
        finish_unwritten(handler)
        sock, pipelined, unsent = take_socket(stream)
        unsent += ("\r\n".join(response) + "\r\n\r\n").encode("latin-1")

        def on_gone(code: int, reason: str) -> None:
            self.client_terminated = self.server_terminated = True
            handler.on_ws_connection_close(code, reason)

        # open() runs before the socket is connected: what it sends (the
        # welcome, or a refusal's close frame) is written by connection_made,
        # and the socket is registered for reading once, already accepted or
        # refused, with no pause and resume around open().
        connection = FrameConnection(self.limits, unsent, on_gone)
        self.transport = connection
        try:
            result = handler.open(*handler.open_args, **handler.open_kwargs)
            if result is not None:
                await result
        except Exception:
            handler.log_exception(*sys.exc_info())
            # The 101 is not out yet: it goes, then a 1011 close, and the
            # client learns the server failed rather than seeing a cut.
            connection.close(CloseCode.INTERNAL, "")
        connection.start(pipelined)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: connection, sock)
        except OSError:
            sock.close()
            connection.abandon()

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if self.transport is not None:
            self.transport.close(code or 1000, reason or "")

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.closing

    def write_message(
        self, message: str | bytes | dict[str, Any], binary: bool = False
    ) -> Future[None]:
        if isinstance(message, dict):
            message = tornado.escape.json_encode(message)
        payload = message.encode("utf-8") if isinstance(message, str) else message
        frame = framing.build_frame(framing.OP_BINARY if binary else framing.OP_TEXT, payload)
        future: Future[None] = Future()
        if self.transport is None or not self.transport.send_frame(frame):
            future.set_exception(tornado.websocket.WebSocketClosedError())
        else:
            future.set_result(None)
        return future

    @property
    def selected_subprotocol(self) -> str | None:
        return self._subprotocol

    def write_ping(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.send_frame(framing.ping_frame(data))

    def _process_server_headers(self, key: str | bytes, headers: HTTPHeaders) -> None:
        raise NotImplementedError("server side only")

    def start_pinging(self) -> None:
        """Keepalive belongs to the Session (its sweep), not to the frame layer."""

    async def _receive_frame_loop(self) -> None:
        raise NotImplementedError("frames are read by FrameConnection.data_received")

    def set_nodelay(self, x: bool) -> None:
        """asyncio sets TCP_NODELAY on every TCP transport already."""


def protocol_for(
    handler: tornado.websocket.WebSocketHandler, limits: FrameLimits
) -> tornado.websocket.WebSocketProtocol | None:
    """What ``handler.get_websocket_protocol()`` should return.

    The fast path on plain TCP; Tornado's own (``ServerProtocol13``) on TLS;
    None (Tornado answers 426) for a WebSocket version other than 13.
    """
    if handler.request.headers.get("Sec-WebSocket-Version") != "13":
        return None
    if is_tls(handler):
        return ServerProtocol13(handler, False, websocket_params(handler))
    return FastProtocol(handler, limits)
