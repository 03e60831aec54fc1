"""Every reach into Tornado's private attributes, in one place.

Tornado has no public accessor for these; each use is pinned by ``tornado<7``
in ``setup.cfg`` and covered by tests that fail if an upgrade moves them.
``wsserver.edge.listener`` keeps its own two (``TCPServer._sockets``/``_handlers``),
next to the accept loop they replace.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

import tornado.web
import tornado.websocket
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPInputError, HTTPServerRequest
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError

from wsserver.closecodes import CloseCode
from wsserver.framing import Failure, parse_close
from wsserver.ratelimit import TokenBucket


class ServerProtocol13(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol, remembering the close code the server itself sent.

    Tornado closes on its own for oversized messages (1009), and the handler
    only learns the peer's code, so the logs and the ``closes_total`` metric
    would otherwise show 1006 for those.
    """

    sent_close: tuple[int, str] | None = None
    #: Hardening item 6 on Tornado's path (set after construction): every frame
    #: takes a token, control and continuation frames included (1008 when
    #: empty), and a fragmented message must finish within ``fragment_timeout``
    #: seconds (checked as frames arrive; a silent peer fails keepalive).
    frame_budget: TokenBucket | None = None
    fragment_timeout: float | None = None
    _fragment_started: float | None = None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        # An echo of the client's close frame is not the server's decision.
        if self.sent_close is None and not self.server_terminated and not self.client_terminated:
            self.sent_close = (code or 1000, reason or "")
        super().close(code, reason)

    async def _receive_frame(self) -> None:
        budget = self.frame_budget
        if budget is not None and budget.take():
            await self._fail(CloseCode.POLICY, "too many frames")
            return
        await super()._receive_frame()
        if self.fragment_timeout is None:
            return
        if self._fragmented_message_buffer is None:
            self._fragment_started = None
        elif self._fragment_started is None:
            self._fragment_started = time.monotonic()
        elif time.monotonic() - self._fragment_started >= self.fragment_timeout:
            await self._fail(CloseCode.POLICY, "fragmented message not finished in time")

    async def _fail(self, code: int, reason: str) -> None:
        """Send the close frame, read nothing more, drop the socket once it is out."""
        self.close(code, reason)
        self.client_terminated = True  # ends Tornado's receive loop
        with contextlib.suppress(StreamClosedError):
            await self.stream.write(b"")  # resolves once the buffer is flushed
        self._abort()

    def _handle_message(self, opcode: int, data: bytes) -> Any:
        # Tornado echoes any close code, even those RFC 6455 section 7.4 forbids
        # on the wire (Autobahn 7.9.x), and raises on a non-UTF-8 reason.
        if opcode == 0x8 and not self.client_terminated:
            verdict = parse_close(data)
            if isinstance(verdict, Failure):
                self.sent_close = (verdict.code, verdict.reason)
                self.client_terminated = True
                self.close(verdict.code, verdict.reason)
                return None
        return super()._handle_message(opcode, data)


def websocket_params(handler: tornado.websocket.WebSocketHandler) -> Any:
    """The ``_WebSocketParams`` Tornado builds in ``get_websocket_protocol``."""
    return tornado.websocket._WebSocketParams(
        ping_interval=handler.ping_interval,
        ping_timeout=handler.ping_timeout,
        max_message_size=handler.max_message_size,
        compression_options=handler.get_compression_options(),
    )


def pending_bytes(stream: IOStream) -> int:
    """Bytes written to ``stream`` that the kernel has not taken yet."""
    return len(stream._write_buffer)


def is_tls(handler: tornado.web.RequestHandler) -> bool:
    """True when ``handler``'s request came over TLS on this very socket.

    ``request.protocol`` is not enough: behind a trusted proxy it says "https"
    for a plain TCP connection from the proxy.
    """
    connection = handler.request.connection
    return isinstance(getattr(connection, "stream", None), SSLIOStream)


def take_socket(stream: IOStream) -> tuple[socket.socket, bytes, bytes]:
    """Take ``stream``'s socket away from Tornado, after the 101 was written.

    Returns the socket (now owned by the caller), the bytes Tornado had read
    but nobody consumed (frames a client pipelined behind its handshake), and
    the bytes Tornado had accepted for writing but the kernel had not taken
    (the tail of the 101, on a congested socket). ``stream`` is left holding
    a detached socket object, so its eventual ``close()`` closes nothing.
    """
    read = bytes(stream._read_buffer[: stream._read_buffer_size])
    buffer = stream._write_buffer
    unsent = b"".join(bytes(chunk) for _, chunk in buffer._buffers)[buffer._first_pos :]
    if stream._state is not None:
        stream.io_loop.remove_handler(stream.fileno())
        stream._state = None
    old = stream.socket
    fd = old.detach()
    return socket.socket(old.family, old.type, old.proto, fileno=fd), read, unsent


def finish_unwritten(handler: tornado.web.RequestHandler) -> None:
    """End ``handler``'s request as ``finish()`` would, without writing a response.

    For a 101 that the caller writes itself, after taking the socket, in one
    write with the connection's first frames: ``finish()`` would format the
    headers and send them alone (a system call of their own). What finish()
    does besides is kept: the close callback cleared, the access log line,
    ``on_finish()``; and it marks the handler finished, so Tornado's
    ``_execute`` does not finish it again once ``get()`` returns. Call it after
    ``handler._detach_stream()`` (which ends the HTTP connection's request).
    """
    handler._finished = True
    handler.application.log_request(handler)
    handler.on_finish()


def disconnect_after_response(request: HTTPServerRequest) -> None:
    """Close the HTTP connection once the response to ``request`` is sent.

    Tornado then also answers ``Connection: close``, and reads no request
    pipelined behind this one. Tornado decides this only from the request's
    own headers (``HTTP1Connection._disconnect_on_finish``); there is no
    public switch.
    """
    connection = request.connection
    if isinstance(connection, HTTP1Connection):
        connection._disconnect_on_finish = True


#: The line Tornado's ``HTTP1Connection._read_message_inner`` logs on
#: ``tornado.general`` (args: the connection's context, the HTTPInputError)
#: for a request it cannot parse, before answering a bare 400.
MALFORMED_MESSAGE = "Malformed HTTP message from %s: %s"


def malformed_request_line(error: HTTPInputError) -> str | None:
    """The request line of the request whose parsing raised ``error``, or None.

    Read from the frame that caught it (the one logging ``MALFORMED_MESSAGE``),
    so nothing is kept per request for the rare malformed one: after the
    headers were parsed, the connection's ``_request_start_line``; before,
    the first line of the ``header_data`` the parser was given. Tornado passes
    neither to the log call.
    """
    code = HTTP1Connection._read_message_inner.__code__
    trace = error.__traceback__
    while trace is not None and trace.tb_frame.f_code is not code:
        trace = trace.tb_next
    if trace is None:
        return None
    local = trace.tb_frame.f_locals
    connection = local.get("self")
    start = getattr(connection, "_request_start_line", None)
    if start is not None:
        return f"{start.method} {start.path} {start.version}"
    data = local.get("header_data")
    if not isinstance(data, bytes):
        return None
    # As Tornado's _parse_headers reads it: latin-1, up to the first LF.
    data = data.lstrip(b"\r\n")
    end = data.find(b"\n")
    return (data if end < 0 else data[:end]).decode("latin-1").rstrip("\r")


def chunked_output(connection: object) -> bool:
    """Whether the response being written on ``connection`` uses chunked
    transfer encoding (decided by Tornado when it wrote the headers).

    HTTP streaming writes its events to the stream itself, in chunks framed
    as Tornado would (``HTTP1Connection._format_chunk``), so that each write
    has a Future of its own (``HTTP1Connection.write`` keeps only the last).
    """
    return isinstance(connection, HTTP1Connection) and bool(connection._chunking_output)
