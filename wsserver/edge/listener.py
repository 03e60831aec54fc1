"""Accepting connections without spinning when descriptors run out.

Tornado's accept handler lets ``accept()`` errors other than "nothing to
accept" escape to the IOLoop, which logs them; the listening socket stays
readable, so at EMFILE the server logs a traceback on every loop turn, at full
CPU, until a descriptor frees up. Here a resource error pauses accepting for a
moment instead (asyncio's own servers do the same) and says so once, in a line
an operator can act on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from tornado.httpserver import HTTPServer
from tornado.httputil import (
    HTTPConnection,
    HTTPHeaders,
    HTTPMessageDelegate,
    RequestStartLine,
    ResponseStartLine,
)
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream
from tornado.netutil import ssl_wrap_socket

if TYPE_CHECKING:
    from wsserver.edge.native import NativeUpgrades

log = logging.getLogger("wsserver.listener")

#: accept() errors that mean "out of resources for now", not "bad socket".
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Seconds accepting stays paused after a resource error.
ACCEPT_PAUSE = 0.5
#: At most one warning per this many seconds while the condition lasts.
WARNING_EVERY = 10.0
#: Connections accepted per readiness event, as Tornado does (its listen backlog).
ACCEPT_BATCH = 128


class Acceptor:
    """Accepts connections on one listening socket, pausing on resource errors."""

    def __init__(
        self,
        sock: socket.socket,
        callback: Callable[[socket.socket, Any], None],
        pause: float = ACCEPT_PAUSE,
    ) -> None:
        self.sock = sock
        self.callback = callback
        self.pause = pause
        self.io_loop = IOLoop.current()
        self.paused = False
        self.removed = False
        self.refused = 0
        self._warned_at = -math.inf
        self.io_loop.add_handler(sock, self._on_readable, IOLoop.READ)

    def _on_readable(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.removed or self.paused:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return  # everything waiting has been accepted
            except ConnectionAbortedError:
                continue  # closed while still in the accept queue
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    raise
                self._pause_for(exc.errno)
                return
            self.callback(connection, address)

    def _pause_for(self, error: int) -> None:
        self.paused = True
        self.refused += 1
        self.io_loop.remove_handler(self.sock)
        self.io_loop.call_later(self.pause, self._resume)
        now = time.monotonic()
        if now - self._warned_at >= WARNING_EVERY:
            self._warned_at = now
            log.warning(
                "cannot accept connections: %s; pausing accepts for %.1fs (raise the open "
                "file limit, or lower --max-connections / --header-timeout)",
                os.strerror(error), self.pause,
            )

    def _resume(self) -> None:
        if self.removed:
            return
        self.paused = False
        self.io_loop.add_handler(self.sock, self._on_readable, IOLoop.READ)

    def remove(self) -> None:
        """Stop accepting on this socket for good."""
        if not self.removed and not self.paused:
            self.io_loop.remove_handler(self.sock)
        self.removed = True


class Listener(HTTPServer):
    """Tornado's HTTPServer, accepting through :class:`Acceptor`.

    Everything Tornado's accept path does, with its public parts only: the
    socket is wrapped for TLS (``ssl_wrap_socket``; the handshake runs in
    the stream), put in an ``IOStream`` and handed to ``handle_stream``.
    With ``native`` (:class:`~wsserver.edge.native.NativeUpgrades`), a plain
    TCP connection goes there first: a WebSocket upgrade is answered without
    Tornado, anything else comes back to :meth:`to_tornado` untouched.
    """

    _acceptors: list[tuple[socket.socket, Acceptor]]

    def initialize(self, *args: Any, native: NativeUpgrades | None = None,
                   **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.native = native
        #: Streams handed over with part of --header-timeout spent: the
        #: deadline of their first request's head (see start_request).
        self._deadlines: dict[IOStream, asyncio.TimerHandle] = {}

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        if not hasattr(self, "_acceptors"):
            self._acceptors = []
        for sock in sockets:
            self._acceptors.append((sock, Acceptor(sock, self._accepted)))

    def stop(self) -> None:
        """Stop accepting and close the listening sockets (as TCPServer.stop).

        Connections already accepted stay, as Tornado's do: one whose head
        comes during a drain is answered 503 ``draining`` on either path;
        :meth:`close_all_connections` ends them."""
        acceptors, self._acceptors = getattr(self, "_acceptors", []), []
        for sock, acceptor in acceptors:
            acceptor.remove()
            sock.close()

    async def close_all_connections(self) -> None:
        """Close every connection: those still waiting to send their head, then
        Tornado's (as HTTPServer.close_all_connections)."""
        if self.native is not None:
            self.native.close()
        await super().close_all_connections()

    def _accepted(self, connection: socket.socket, address: Any) -> None:
        if self.ssl_options is not None:
            try:
                connection = ssl_wrap_socket(
                    connection, self.ssl_options, server_side=True,
                    do_handshake_on_connect=False,
                )
            except (ssl.SSLError, OSError) as exc:
                # Closed as soon as it was made (a port scan): nothing to serve.
                log.debug("TLS wrap failed: %r", exc)
                connection.close()
                return
        elif self.native is not None:
            try:
                self.native.accepted(connection, address, self.to_tornado)
            except Exception:
                log.exception("error in the native upgrade path")
                connection.close()
            return
        self.to_tornado(connection, address, 0.0)

    def to_tornado(self, connection: socket.socket, address: Any, spent: float) -> None:
        """Serve ``connection`` with Tornado's HTTP server; ``spent``: seconds of
        ``--header-timeout`` already used waiting for its first bytes."""
        try:
            stream: IOStream
            if self.ssl_options is not None:
                stream = SSLIOStream(connection, max_buffer_size=self.max_buffer_size,
                                     read_chunk_size=self.read_chunk_size)
            else:
                stream = IOStream(connection, max_buffer_size=self.max_buffer_size,
                                  read_chunk_size=self.read_chunk_size)
            timeout = self.conn_params.header_timeout
            if spent > 0 and timeout is not None:
                # Tornado's own timeout starts now: the head must still be
                # complete within --header-timeout of the accept.
                self._deadlines[stream] = asyncio.get_running_loop().call_later(
                    max(0.0, timeout - spent), self._head_late, stream
                )
            self.handle_stream(stream, address)
        except Exception:
            log.exception("error in connection callback")

    def start_request(
        self, server_conn: object, request_conn: HTTPConnection
    ) -> HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        if self._deadlines:
            stream = getattr(server_conn, "stream", None)
            timer = self._deadlines.pop(stream, None)  # type: ignore[arg-type]
            if timer is not None:
                return _HeadDeadline(delegate, timer)
        return delegate

    def _head_late(self, stream: IOStream) -> None:
        # The head did not arrive in time: closed without an answer, as
        # Tornado closes a connection at its own header timeout.
        self._deadlines.pop(stream, None)
        stream.close()


class _HeadDeadline(HTTPMessageDelegate):
    """A first request's delegate, cancelling the head's deadline once the head came."""

    def __init__(self, delegate: HTTPMessageDelegate, timer: asyncio.TimerHandle) -> None:
        self.delegate = delegate
        self.timer = timer

    def headers_received(
        self, start_line: RequestStartLine | ResponseStartLine, headers: HTTPHeaders
    ) -> Awaitable[None] | None:
        self.timer.cancel()
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.timer.cancel()
        self.delegate.on_connection_close()
