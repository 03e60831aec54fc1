"""The frame path: after the 101, the socket runs on the frame layer.

An upgraded socket comes either from the native path
(:mod:`wsserver.edge.native`: plain TCP, answered at accept time) or from
Tornado's HTTP server (TLS, whose ``SSLIOStream`` did the TLS handshake, and
the heads the native path leaves), where :class:`UpgradeHandler` answers the
101 itself, negotiating permessage-deflate (:mod:`wsserver.deflate`), and
takes the socket away from the ``IOStream``. Either way :func:`serve` hands
it to a :class:`FrameConnection`: a plain socket through the loop's
``connect_accepted_socket``, a TLS one (an ``ssl.SSLSocket``, its TLS state
inside it) through :class:`~wsserver.edge.tlstransport.TLSSocketTransport`.
Both schemes then run on the same frame layer, with the same limits and
close codes: ``data_received`` feeds the sans-I/O
:class:`~wsserver.connection.ServerConnection`, which parses and decides, and
what one step of the loop sends a connection goes to the transport in one
write: the 101 with the welcome, the replies to a read at its end, other
frames (fan-out, pings) right after the step. Works on any asyncio loop
(uvloop's is faster).

``open(connection)`` runs after the 101 is decided and before the socket is
read; it sets ``connection.receiver`` to accept the connection. Frames are
read only after ``open()`` returned and only when a receiver is set: a
refused connection (``open()`` called ``connection.close(4001, ...)`` and set
no receiver) has its pipelined frames dropped unread and its TCP connection
closed as soon as the close frame is flushed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import tornado.web
from tornado.iostream import StreamClosedError
from tornado.util import ObjectDict

from wsserver import deflate, framing
from wsserver.closecodes import CloseCode
from wsserver.config import Settings
from wsserver.connection import Ending, ServerConnection, State
from wsserver.deflate import Deflate, Inflater
from wsserver.edge.tlstransport import TLSSocketTransport
from wsserver.edge.tornado_internals import take_socket
from wsserver.framing import Close, Failure, FrameParser, Ping, Pong
from wsserver.handshake import (
    Answer,
    offered_subprotocols,
    switching_protocols,
    upgrade_problem,
)
from wsserver.ratelimit import TokenBucket
from wsserver.transport import Prepared, Receiver, TimerHandle

log = logging.getLogger("wsserver.fastpath")

# Module constants: an enum member looked up on its class costs a few hundred
# nanoseconds, which the per-message paths below would pay every time.
_OPEN = State.OPEN
_CLOSING = State.CLOSING
_CLOSED = State.CLOSED
_text_message = framing.text_message


@dataclass(frozen=True)
class FrameLimits:
    """What one connection's frames may do, and how it compresses (from ``Settings``)."""

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
    #: Negotiate permessage-deflate when the client offers it.
    compression: bool = True
    #: Messages under this many bytes go uncompressed.
    compression_threshold: int = 256

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
            compression=settings.compression == "on",
            compression_threshold=settings.compression_threshold,
        )

    def parser(self, negotiated: Deflate | None = None) -> FrameParser:
        """A fresh parser holding these limits (inflating when ``negotiated``)."""
        budget = None
        if self.frame_rate is not None:
            budget = TokenBucket(self.frame_rate, self.frame_burst)
        inflater = None
        if negotiated is not None:
            inflater = Inflater(
                negotiated.client_window_bits, negotiated.client_no_context_takeover
            )
        return FrameParser(
            self.max_message_size, budget, self.fragment_timeout, inflater=inflater
        )


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

    The I/O half of the connection, the same for ``ws://`` (asyncio's socket
    transport) and ``wss://`` (:class:`~wsserver.edge.tlstransport.TLSSocketTransport`):
    it reads, writes what the sans-I/O :class:`~wsserver.connection.ServerConnection`
    returns (batched, one write per step), and runs its timers. What a frame
    means, the state, and the closing handshake are the ServerConnection's.

    ``receiver`` gets the messages; ``on_gone`` (optional) is called once after
    ``receiver.on_closed``, for whoever must forget the connection too.
    ``loop``: the running loop, when the caller has it (asking asyncio for it
    costs a ``getpid`` system call).
    """

    kind = "websocket"

    @property
    def tls(self) -> bool:
        """True when the connection came over TLS (``wss://``)."""
        return isinstance(self._transport, TLSSocketTransport)

    def __init__(
        self,
        limits: FrameLimits,
        unsent: bytes = b"",
        on_gone: Callable[[int, str], None] | None = None,
        deflate: Deflate | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.receiver: Receiver | None = None
        self.limits = limits
        self.protocol = ServerConnection(
            limits.parser(deflate), deflate, limits.compression_threshold
        )
        self._unsent = unsent
        #: Called once after ``receiver.on_closed`` (also when there was no
        #: receiver: a refused connection), for whoever must forget it too.
        self.on_gone = on_gone
        self._transport: asyncio.Transport | None = None
        self._loop = loop or asyncio.get_running_loop()
        #: True once open() returned (see start()).
        self._started = False
        self._pipelined = b""
        #: True once our side has ended (see _end): input is dropped.
        self._discarding = False
        # Frames not yet written: those sent while a read is processed are
        # written at its end; the others by the flusher, after this step.
        self._batch: list[bytes] | None = None
        self._batch_size = 0
        self._reading = False
        self._flusher = _flusher(self._loop)
        self._aborted_by_server = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._fragment_timer: asyncio.TimerHandle | None = None
        self._read_view = _read_buffer()
        #: True while the receiver asked not to be handed messages (pause_reading).
        self._paused = False
        #: Events parsed but not handed over yet (the receiver paused meanwhile).
        self._held: list[framing.Event] = []

    @property
    def state(self) -> State:
        """The connection's :class:`~wsserver.connection.State`."""
        return self.protocol.state

    @property
    def closing(self) -> bool:
        """True once a close frame went either way, or the connection is gone."""
        return self.protocol.state >= _CLOSING

    # ------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if not self._started:
            # Only serve() connects, after start(); a connection made any
            # other way has had no open() and cannot be served.
            log.error("connection made before start(); closing with 1011")
            self.start(b"")
        # The 101 and what open() sent (the welcome, or a refusal's close) in
        # one write: one segment, where two sends would make two.
        unsent, self._unsent = self._unsent, b""
        batch = self._batch
        if unsent:
            if batch is None:
                transport.write(unsent)
            else:
                batch.insert(0, unsent)
                self._batch_size += len(unsent)
        self._flush_batch()
        ending = self.protocol.ending
        if ending is Ending.LINGER:
            # Refused: nothing it sent is read, and it is cut as soon as the
            # close frame is out.
            self._pipelined = b""
            self._end(ending)
            return
        if ending is Ending.AWAIT_CLOSE:
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
        accepted = self.receiver is not None
        if not accepted and not self.closing:
            log.error("open() set no receiver and did not close; closing with 1011")
        self._queue_frame(self.protocol.accepted(accepted))
        self._pipelined = pipelined

    def write_before_connected(self, sock: socket.socket) -> None:
        """Write the 101 and what ``open()`` sent straight to ``sock`` (plain
        TCP, not yet connected to the loop), in one ``send``: they leave in
        this step of the loop rather than when the transport is made, a step
        or two later. What the kernel does not take, ``connection_made`` writes."""
        batch = self._batch
        data = self._unsent + b"".join(batch) if batch else self._unsent
        try:
            sent = sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            return  # the transport finds the connection gone
        self._unsent = data[sent:]
        self._batch = None
        self._batch_size = 0

    def abandon(self) -> None:
        """The socket never got connected: the connection is over (1006)."""
        self._aborted_by_server = self.protocol.close_sent is None
        self._transport_gone()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_view[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        """Parse ``data`` (the next bytes read) and act on every event in it."""
        if self._discarding:
            return  # our side has ended: what still comes is read and dropped
        events = self.protocol.receive_data(data)
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
        protocol = self.protocol
        self._reading = True
        try:
            for index, event in enumerate(events):
                if self._paused:
                    self._held[:0] = events[index:]
                    break
                kind = type(event)
                if kind is str:
                    if receiver is not None and protocol.state is _OPEN:
                        receiver.on_text(event)  # type: ignore[arg-type]
                elif kind is bytes:
                    if receiver is not None and protocol.state is _OPEN:
                        receiver.on_binary(event)  # type: ignore[arg-type]
                elif kind is Ping:
                    # A peer that does not read its backlog gets no more pongs
                    # (RFC 6455 section 5.5.3 lets a pong answer only the latest
                    # ping): pings must not grow the backlog past the bound.
                    bound = self.limits.max_write_buffer
                    if bound is None or self.buffered() < bound:
                        self._queue_frame(protocol.ping_received(event.data))  # type: ignore[union-attr]
                elif kind is Pong:
                    if receiver is not None and protocol.state is _OPEN:
                        receiver.on_pong(event.data)  # type: ignore[union-attr]
                elif kind is Close:
                    self._send_final(protocol.close_received_frame(event))  # type: ignore[arg-type]
                else:
                    assert isinstance(event, Failure)
                    # DEBUG: the Session logs the close (one line per connection, throttled).
                    log.debug("failing the connection with %d: %s", event.code, event.reason)
                    self._send_final(protocol.failed(event))
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
        """Queue one message, compressed when negotiated; False when closing."""
        protocol = self.protocol
        if protocol.compressed_encoding is None:
            return self.send_frame(message.encoded(_text_message))
        return self.send_frame(message.encoded(protocol.encoding(len(message.payload))))

    def send_data(self, data: bytes, binary: bool = False) -> bool:
        """Queue one message built for this connection alone (compressed when
        negotiated); False when closing."""
        if not self.protocol.can_send:
            return False
        return self.send_frame(self.protocol.encode_data(data, binary))

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
        if self.protocol.state > _OPEN:
            return False
        batch = self._batch
        if batch is None:
            batch = self._batch = []
            if not self._reading and self._transport is not None:
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
        frame = self.protocol.close(code, reason)
        if frame is None:
            return
        self._send_final(frame)
        # Messages are dropped from now on; the peer's close frame must be read.
        self.resume_reading()

    def abort(self) -> None:
        """Cut the TCP connection now."""
        transport = self._transport
        if transport is not None and self.protocol.state is not _CLOSED:
            if self.protocol.close_sent is None and self.protocol.close_received is None:
                self._aborted_by_server = True
            transport.abort()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` after ``delay`` seconds on this connection's loop."""
        return self._loop.call_later(delay, callback)

    # -------------------------------------------------------------- internals

    def _queue_frame(self, frame: bytes | None) -> None:
        if frame is None:
            return
        batch = self._batch
        if batch is None:
            batch = self._batch = []
            if not self._reading and self._transport is not None:
                self._flusher.add(self)
        batch.append(frame)
        self._batch_size += len(frame)

    def _flush_batch(self) -> None:
        batch = self._batch
        transport = self._transport
        if batch is None or transport is None:
            return  # not connected yet: connection_made writes the batch
        self._batch = None
        self._batch_size = 0
        if self.protocol.state is not _CLOSED:
            transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    def _send_final(self, frame: bytes | None) -> None:
        """Write ``frame`` (a close frame, or None) behind everything batched,
        then end TCP as the protocol's :attr:`~ServerConnection.ending` says."""
        if self._transport is None:
            # Not connected yet (refused in open()): connection_made decides.
            self._queue_frame(frame)
            return
        self._queue_frame(frame)
        if not self._reading:
            self._flush_batch()
        ending = self.protocol.ending
        if ending is Ending.AWAIT_CLOSE:
            if self._close_timer is None:
                self._close_timer = self._loop.call_later(self.limits.close_timeout, self.abort)
        elif ending is not None:
            self._flush_batch()
            self._end(ending)

    def _end(self, ending: Ending) -> None:
        """End our side once the close frame is out, without losing it
        (:class:`~wsserver.connection.Ending`): at once after the client's
        close, else a lingering close; a hard cut after ``close_timeout``."""
        transport = self._transport
        linger = ending is Ending.LINGER
        if transport is None or transport.is_closing() or (linger and self._discarding):
            return
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._close_timer = self._loop.call_later(self.limits.close_timeout, self.abort)
        if not linger:
            transport.pause_reading()
            transport.close()  # the transport writes what is buffered first
        elif transport.can_write_eof():
            self._discarding = True
            transport.write_eof()  # after the buffered bytes
        else:
            transport.close()

    def _arm_fragment_timer(self) -> None:
        started = self.protocol.parser.fragment_started
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
        frame = self.protocol.fragment_expired(self._loop.time())
        if frame is not None:
            self._send_final(frame)
        else:
            self._arm_fragment_timer()

    def _transport_gone(self) -> None:
        if self.protocol.state is _CLOSED:
            return
        code, reason, by_server = self.protocol.connection_lost(self._aborted_by_server)
        for timer in (self._close_timer, self._fragment_timer):
            if timer is not None:
                timer.cancel()
        self._close_timer = self._fragment_timer = None
        self._batch = None
        self._batch_size = 0
        self._held = []
        receiver = self.receiver
        self.receiver = None
        if receiver is not None:
            try:
                receiver.on_closed(code, reason, by_server)
            except Exception:
                log.exception("receiver.on_closed failed")
        on_gone, self.on_gone = self.on_gone, None
        if on_gone is not None:
            try:
                on_gone(code, reason)
            except Exception:
                log.exception("on_gone failed")


Opener = Callable[["FrameConnection"], Awaitable[None] | None]


async def serve(
    sock: socket.socket,
    limits: FrameLimits,
    response: bytes,
    negotiated: Deflate | None,
    open_connection: Opener,
    pipelined: bytes = b"",
    on_error: Callable[[], None] | None = None,
) -> None:
    """Run an upgraded socket on the frame layer (both ways in: Tornado's and the native path).

    ``response`` is the 101, which goes out with what ``open_connection``
    sends. ``open_connection(connection)`` runs *before* the socket is
    connected to the loop, so the socket is registered for reading once,
    already accepted or refused, with no pause and resume around it; it
    accepts by setting ``connection.receiver``. ``pipelined``: bytes the
    client sent behind its handshake that were read already. ``on_error``
    logs an exception of ``open_connection`` (called while it is handled).
    """
    loop = asyncio.get_running_loop()
    connection = FrameConnection(limits, response, deflate=negotiated, loop=loop)
    try:
        result = open_connection(connection)
        if result is not None:
            await result
    except Exception:
        if on_error is None:
            log.exception("open() failed; closing with 1011")
        else:
            on_error()
        # The 101 is not out yet: it goes, then a 1011 close, and the
        # client learns the server failed rather than seeing a cut.
        connection.close(CloseCode.INTERNAL, "")
    connection.start(pipelined)
    if isinstance(sock, ssl.SSLSocket):
        TLSSocketTransport(loop, sock, connection)
        return
    connection.write_before_connected(sock)
    try:
        await loop.connect_accepted_socket(lambda: connection, sock)
    except OSError:
        sock.close()
        connection.abandon()


class UpgradeHandler(tornado.web.RequestHandler):
    """``GET`` with ``Upgrade: websocket``: the 101 (RFC 6455 section 4.2), then the frame layer.

    Tornado parses the request (over TCP or TLS); this handler checks the
    upgrade, answers it itself, negotiating permessage-deflate when
    ``limits.compression`` allows (:mod:`wsserver.deflate`), and hands the
    socket to a :class:`FrameConnection`. Subclasses set :attr:`limits` and
    implement :meth:`open`, which accepts a connection by setting its
    ``receiver``; :meth:`check_origin` and :meth:`select_subprotocol` are the
    other hooks. Nothing of Tornado's WebSocket implementation is used.
    """

    #: The frame limits and compression settings of the connections it opens.
    limits: FrameLimits = FrameLimits()

    async def get(self, *args: str, **kwargs: str) -> None:
        headers = self.request.headers
        problem = upgrade_problem(headers.get, self.check_origin)
        if problem is not None:
            self.answer(problem)
            return
        offered = offered_subprotocols(headers.get("Sec-WebSocket-Protocol"))
        subprotocol = self.select_subprotocol(offered)
        if subprotocol is not None:
            assert subprotocol in offered
        negotiated = extension = None
        if self.limits.compression:
            accepted = deflate.negotiate(headers.get("Sec-WebSocket-Extensions"))
            if accepted is not None:
                negotiated, extension = accepted
        await self.upgrade(
            switching_protocols(headers["Sec-WebSocket-Key"], subprotocol, extension), negotiated
        )

    def answer(self, answer: Answer) -> None:
        """Answer a request that is no upgrade (400, 403, 426)."""
        self.set_status(answer.status)
        for name, value in answer.headers:
            self.set_header(name, value)
        self.finish(answer.message)

    def check_origin(self, origin: str) -> bool:
        """Whether a browser page from ``origin`` may connect: by default only
        the same host (as Tornado's default). Browsers apply no same-origin
        policy to WebSockets, so this check is what keeps other sites' pages
        from connecting with a visitor's credentials."""
        netloc = urllib.parse.urlsplit(origin).netloc.lower()
        return netloc == self.request.headers.get("Host", "").lower()

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        """The subprotocol to answer, one of ``subprotocols``, or None."""
        return None

    def open(self, connection: FrameConnection) -> Awaitable[None] | None:
        """After the 101: accept by setting ``connection.receiver``, or refuse
        with ``connection.close(code, reason)`` and no receiver (what the
        client pipelined is then never read). Runs before the socket is read;
        what it sends goes out with the 101."""
        return None

    async def upgrade(self, response: bytes, negotiated: Deflate | None) -> bool:
        """Send the 101 ``response`` and run the connection (:func:`serve`,
        with :meth:`open`); False when the client left before it could be."""
        # The 101 goes out with open()'s first frames, in one write (see
        # connection_made); finish() would send it alone. detach() ends the
        # request as finish() would, so the access line and on_finish() are ours.
        self.set_status(101)
        stream = self.detach()
        self.application.log_request(self)
        self.on_finish()
        self.ui = ObjectDict()  # drops the reference cycle, as finish() does
        try:
            sock, pipelined = await take_socket(stream)
        except StreamClosedError:
            return False  # the client left during the 101
        await serve(sock, self.limits, response, negotiated, self.open, pipelined,
                    on_error=lambda: self.log_exception(*sys.exc_info()))
        return True
