"""Plain-TCP WebSocket upgrades answered at accept time, outside Tornado's HTTP server.

Tornado's HTTP machinery (an ``IOStream``, an ``HTTP1Connection``, request
and handler objects, the detach and the socket's hand-over) was the largest
part of a connect's CPU. Here, right after ``accept()``, the listener
(:class:`~wsserver.edge.listener.Listener`) hands the socket to
:class:`NativeUpgrades`, which looks at the request head *without consuming
it* (``recv(MSG_PEEK)``, once the socket is readable):

* a complete head that is a ``GET /ws`` upgrade the native path takes
  (:func:`wsserver.handshake.native_request`: HTTP/1.1, a complete RFC 6455
  upgrade, no body, in the strict subset of :mod:`wsserver.httphead`) is
  consumed and answered here: :func:`wsserver.handshake.decide` (the checks
  Tornado's ``WebSocketHandler`` runs, the same function), then the refusal
  (:mod:`wsserver.edge.refusal`, the same bytes) or the 101, written with the
  welcome in one write by the frame layer (:func:`wsserver.edge.fastpath.serve`);
* anything else (another path, a partial head, a malformed or odd one,
  HTTP/1.0) goes to Tornado untouched, every byte still in the kernel;
* nothing at all within ``--header-timeout``: the connection is closed, as
  Tornado closes one; a head that is not complete within
  ``--max-header-size`` bytes goes to Tornado, which refuses it as before.

TLS connections never come here (their bytes are encrypted): the listener
gives them to Tornado's ``SSLIOStream``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from wsserver.edge.app import access_line
from wsserver.edge.fastpath import FrameConnection, FrameLimits, serve
from wsserver.edge.handlers import log_uncaught
from wsserver.edge.refusal import Refusal, refusal, response
from wsserver.handshake import (
    Answer,
    NotNative,
    Refused,
    UpgradeRequest,
    decide,
    native_request,
    open_session,
)
from wsserver.httphead import END, RequestHead, parse_head
from wsserver.netaddr import limit_key
from wsserver.services import Services

access_log = logging.getLogger("wsserver.access")

#: ``(socket, address, seconds already spent waiting for the head)``: give a
#: connection to Tornado's HTTP server.
ToTornado = Callable[[socket.socket, Any, float], None]

# The accepted socket stays in blocking mode until the frame layer connects
# it (which makes it non-blocking): until then each call says it may not
# wait, saving a system call per connect.
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_NOWAIT = socket.MSG_DONTWAIT
#: Tornado's answer to an uncaught exception (on a connection closed after it).
_INTERNAL_ERROR = Refusal(
    500, (), b"<html><title>500: Internal Server Error</title>"
    b"<body>500: Internal Server Error</body></html>",
)


class NativeUpgrades:
    """The native path of one listener: ``accepted(sock, address, to_tornado)``
    for every plain-TCP connection it accepts.

    Args:
        services: the server's services (the handshake's checks, sessions).
        limits: the frame limits of the connections it upgrades.
        header_timeout: seconds a client has to send its request head.
        max_header_size: bytes the head may take, through its blank line.
    """

    def __init__(
        self,
        services: Services,
        limits: FrameLimits,
        *,
        header_timeout: float,
        max_header_size: int,
    ) -> None:
        self.services = services
        self.limits = limits
        self.header_timeout = header_timeout
        self.max_header_size = max_header_size
        self._peeked = bytearray(max_header_size)
        self._peeked_view = memoryview(self._peeked)
        #: Sockets waiting for their first bytes, by descriptor, in the order
        #: they came (which is their deadlines' order).
        self._waiting: dict[int, _Waiting] = {}
        #: The timer of the oldest wait's deadline (one for all of them).
        self._expiry: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Handshakes running (awaiting their checks or the session's open).
        self._running: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """Connections accepted that have sent nothing yet."""
        return len(self._waiting)

    def accepted(self, sock: socket.socket, address: Any, to_tornado: ToTornado) -> None:
        """Take a connection just accepted: answer it here, or give it to Tornado."""
        loop = self._loop
        if loop is None:
            # Kept: each get_running_loop() asks the kernel for the pid.
            loop = self._loop = asyncio.get_running_loop()
        if self._settle(sock, address, to_tornado, 0.0):
            return
        # Nothing to read yet: wait for it, at most --header-timeout.
        waiting = _Waiting(sock, address, to_tornado, loop.time())
        fd = sock.fileno()
        self._waiting[fd] = waiting
        loop.add_reader(fd, self._readable, waiting)
        if self._expiry is None:
            self._expiry = loop.call_at(waiting.since + self.header_timeout, self._expire)

    def close(self) -> None:
        """Close every connection still waiting for its head (the listener closes its
        connections: the end of a shutdown)."""
        waiting, self._waiting = self._waiting, {}
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for fd, entry in waiting.items():
            self._remove_reader(fd)
            entry.sock.close()

    # --- waiting for the head ----------------------------------------------------------

    def _readable(self, waiting: _Waiting) -> None:
        fd = waiting.sock.fileno()
        del self._waiting[fd]
        self._remove_reader(fd)
        assert self._loop is not None
        spent = self._loop.time() - waiting.since
        if not self._settle(waiting.sock, waiting.address, waiting.to_tornado, spent):
            # Readable, yet nothing to peek (a spurious wake-up): Tornado waits
            # the rest of the header timeout.
            waiting.to_tornado(waiting.sock, waiting.address, spent)

    def _expire(self) -> None:
        """Close the connections that sent nothing within --header-timeout,
        without an answer (as Tornado closes one at its header timeout)."""
        self._expiry = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        expired = []
        # Every wait is as long, so the dict's order (arrival) is the deadlines'.
        for fd, waiting in self._waiting.items():
            deadline = waiting.since + self.header_timeout
            if deadline > now:
                self._expiry = loop.call_at(deadline, self._expire)
                break
            expired.append(fd)
        for fd in expired:
            self._remove_reader(fd)
            self._waiting.pop(fd).sock.close()

    def _remove_reader(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.remove_reader(fd)

    def _settle(self, sock: socket.socket, address: Any, to_tornado: ToTornado,
                spent: float) -> bool:
        """Answer or hand over the connection if its first bytes are there; False if none are."""
        peeked = self._peeked
        try:
            size = sock.recv_into(peeked, self.max_header_size, _PEEK)
        except BlockingIOError:
            return False
        except OSError:
            sock.close()  # reset before it sent anything
            return True
        if size == 0:
            sock.close()  # closed before it sent anything
            return True
        end = peeked.find(END, 0, size)
        head = parse_head(bytes(self._peeked_view[: end + 4])) if end >= 0 else None
        try:
            if head is None:
                raise NotNative("no complete head in the first read, or not a plain one")
            token = native_request(head)
        except NotNative:
            to_tornado(sock, address, spent)
            return True
        # The head is ours: consume it. Frames pipelined behind it stay in the
        # kernel for the frame layer.
        try:
            sock.recv_into(peeked, end + 4, _NOWAIT)
        except OSError:
            sock.close()
            return True
        assert self._loop is not None
        task = self._loop.create_task(
            self._handshake(sock, address, head, token)
        )
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return True

    # --- the handshake -----------------------------------------------------------------

    async def _handshake(
        self, sock: socket.socket, address: Any, head: RequestHead, token: str | None
    ) -> None:
        started = time.monotonic()
        services = self.services
        # As Tornado's: an IP socket's address is a tuple (host first); the
        # socket's family is not asked (an enum built per call).
        peer = address[0] if isinstance(address, tuple) else "0.0.0.0"
        header = head.header
        client = services.proxies.client_address(
            peer, header("X-Forwarded-For"), header("X-Real-IP")
        )
        key = limit_key(client)
        try:
            decision = await decide(
                services,
                UpgradeRequest(head.version, header, lambda: token, client, key,
                               lambda: _gone(sock)),
                compression=self.limits.compression,
            )
        except Exception as error:
            log_uncaught("GET", head.target, client, error)
            # And Tornado's access line for its 500 (ERROR, even with --no-access-log).
            access_line(access_log.error, 500, "GET", head.target, client,
                        1000 * (time.monotonic() - started))
            await _answer_and_close(sock, response(_INTERNAL_ERROR), self.header_timeout)
            return
        if decision is None:
            sock.close()
            return
        if isinstance(decision, Refused):
            answer = refusal(services, decision.rejection, limit_key=key, client_address=client)
            await _answer_and_close(sock, response(answer), self.header_timeout)
            return
        if isinstance(decision, Answer):
            # native_request() lets no such request through; answered as
            # Tornado would, but on a connection that is then closed.
            plain = Refusal(decision.status, decision.headers, decision.message.encode())
            await _answer_and_close(sock, response(plain), self.header_timeout)
            return
        if access_log.isEnabledFor(logging.DEBUG):
            # Tornado's access line for a 101 (the session's "open" line says more).
            access_line(access_log.debug, 101, "GET", head.target, client,
                        1000 * (time.monotonic() - started))
        upgraded = decision

        def open_connection(connection: FrameConnection) -> Any:
            return open_session(services, connection, upgraded)

        def log_failure() -> None:
            log_uncaught("GET", head.target, client, sys.exc_info()[1])

        await serve(sock, self.limits, upgraded.response, upgraded.deflate, open_connection,
                    on_error=log_failure)


class _Waiting:
    """A connection accepted before its first bytes came."""

    __slots__ = ("address", "since", "sock", "to_tornado")

    def __init__(self, sock: socket.socket, address: Any, to_tornado: ToTornado,
                 since: float) -> None:
        self.sock = sock
        self.address = address
        self.to_tornado = to_tornado
        self.since = since


def _gone(sock: socket.socket) -> bool:
    """True when the client has closed its side (or reset) while the checks waited."""
    try:
        return sock.recv(1, _PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def _answer_and_close(sock: socket.socket, data: bytes, timeout: float) -> None:
    """Write a short answer, then close the connection (as Tornado closes a
    refused handshake's); a client that does not read it is cut after ``timeout``."""
    try:
        sent = sock.send(data, _NOWAIT)  # usually all: an empty send buffer
        if sent < len(data):
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_sendall(sock, data[sent:]), timeout)
        # Closing a socket with unread input makes the kernel answer with a
        # reset, which can destroy the answer before the client reads it:
        # what the client already sent (requests pipelined behind this one)
        # is read and dropped first, up to what Tornado would have read.
        _discard_input(sock, DRAIN_LIMIT)
    except (OSError, TimeoutError):
        pass
    finally:
        sock.close()


#: Bytes of input read and dropped before closing a refused connection
#: (Tornado's read chunk: what it would hold already).
DRAIN_LIMIT = 65536
_scrap = bytearray(16384)


def _discard_input(sock: socket.socket, limit: int) -> None:
    while limit > 0:
        try:
            size = sock.recv_into(_scrap, min(limit, len(_scrap)), _NOWAIT)
        except BlockingIOError:
            return
        if size == 0:
            return
        limit -= size
