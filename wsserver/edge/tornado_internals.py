"""Every reach into a private attribute of Tornado, in one place.

Tornado has no public accessor for these; each use is pinned by ``tornado<7``
in ``setup.cfg`` and checked by ``tests/unit/test_internals.py``,
which fails loudly, naming the attribute, when an upgrade moves one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPInputError, HTTPServerRequest
from tornado.iostream import IOStream

#: The private attributes used below, by class: what the test checks.
USED: dict[str, tuple[str, ...]] = {
    "tornado.http1connection.HTTP1Connection": (
        "_disconnect_on_finish", "_read_message_inner", "_request_start_line",
    ),
}


async def take_socket(stream: IOStream) -> tuple[socket.socket, bytes]:
    """Take ``stream``'s socket away from Tornado, after the request was detached.

    Returns the socket, now the caller's, and the bytes Tornado had read but
    nobody consumed (frames a client pipelined behind its handshake). A TLS
    stream's socket is its ``ssl.SSLSocket``, TLS state and all. Public API
    only: what Tornado still has to write (the tail of an earlier response on
    a congested socket) is flushed first; a read of everything buffered
    completes at once when Tornado holds bytes, and otherwise reads the socket
    once and is dropped with the stream.
    """
    if stream.writing():
        await stream.write(b"")  # resolves once everything queued is written
    pending = asyncio.ensure_future(stream.read_bytes(stream.max_buffer_size, partial=True))
    pipelined = pending.result() if pending.done() else b""
    stream.io_loop.remove_handler(stream.fileno())
    old = stream.socket
    if isinstance(old, ssl.SSLSocket):
        # The stream is dropped, never closed: the SSLSocket is ours now.
        return old, pipelined
    # A plain socket leaves the stream detached, so that closing the stream
    # (at shutdown, Tornado closes what it still tracks) closes nothing.
    fd = old.detach()
    return socket.socket(old.family, old.type, old.proto, fileno=fd), pipelined


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
