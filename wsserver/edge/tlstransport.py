"""A TLS connection's socket driven on the event loop after the 101.

Tornado's ``SSLIOStream`` terminates TLS and carries the HTTP upgrade; after
the 101, :class:`TLSSocketTransport` takes the stream's non-blocking
``ssl.SSLSocket`` (its TLS state stays inside it) and drives it with the loop's
``add_reader``/``add_writer``, as asyncio's own socket transports drive a plain
socket. It implements the part of ``asyncio.Transport`` that
``wsserver.edge.fastpath.FrameConnection`` uses, and calls the protocol's
``asyncio.BufferedProtocol`` methods, so ``ws://`` and ``wss://`` connections
run on the same frame layer. It works on asyncio's loop and on uvloop.

Two things differ from a plain socket:

* OpenSSL returns one TLS record per read and keeps the rest of what it
  decrypted (``SSLSocket.pending()``): those bytes raise no readiness event,
  so a read that leaves some schedules the next read itself.
* A write that OpenSSL could not finish (``SSLWantWriteError``) must be
  retried with the same bytes; OpenSSL may also need to read to write, or
  write to read (``SSLWantReadError`` on a write, ``SSLWantWriteError`` on a
  read), and each is retried when the socket is ready the other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any, cast

log = logging.getLogger("wsserver.fastpath")

#: Records read per readiness event before other connections get a turn.
READS_PER_EVENT = 16
#: Bytes handed to one ``SSL_write``: OpenSSL cuts them into 16 KiB records.
WRITE_CHUNK = 256 * 1024


class TLSSocketTransport:
    """The ``asyncio.Transport`` subset the frame layer uses, over an ``SSLSocket``.

    Args:
        loop: the running loop.
        sock: a connected, handshaken, non-blocking ``ssl.SSLSocket``, now
            owned by this transport.
        protocol: an ``asyncio.BufferedProtocol``; ``connection_made`` is
            called at once, reading starts after it.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: ssl.SSLSocket,
        protocol: asyncio.BufferedProtocol,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        #: The bytes of the last write OpenSSL did not finish (retried as they are).
        self._pending: bytes | None = None
        self._queue: list[bytes] = []
        self._queued = 0
        self._reading = False
        self._paused = False
        self._writing = False
        #: close() or write_eof() asked for, once everything is written.
        self._closing = False
        self._eof_asked = False
        self._eof_sent = False
        self._gone = False
        #: OpenSSL asked to read before it can write, or to write before it can read.
        self._write_wants_read = False
        self._read_wants_write = False
        with contextlib.suppress(OSError):
            # As asyncio does for its TCP transports: frames leave at once.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol.connection_made(self)  # type: ignore[arg-type]
        if not self._closing and not self._paused:
            self._start_reading()
            # What OpenSSL decrypted already (frames pipelined behind the
            # handshake) raises no readiness event.
            if sock.pending():
                loop.call_soon(self._on_readable)

    # ------------------------------------------------------------ reading

    def _start_reading(self) -> None:
        if not self._reading and not self._gone:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _on_readable(self) -> None:
        if not self._reading:
            return  # paused or closed since this call was scheduled
        if self._write_wants_read:
            self._write_wants_read = False
            self._on_writable()
        sock = self._sock
        protocol = self._protocol
        for _ in range(READS_PER_EVENT):
            buffer = cast(memoryview, protocol.get_buffer(-1))
            try:
                count = sock.recv_into(buffer)
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                return
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                self._start_writing()
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                count = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if not count:
                self._eof()
                return
            protocol.buffer_updated(count)
            if not self._reading:
                return
            if count < len(buffer) and not sock.pending():
                return  # most likely all there was; the kernel says if not
        self._loop.call_soon(self._on_readable)

    def _eof(self) -> None:
        self._stop_reading()
        keep_open = False
        try:
            keep_open = bool(self._protocol.eof_received())
        except Exception:
            log.exception("eof_received failed")
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        """Stop reading the socket until :meth:`resume_reading`."""
        if self._paused or self._closing:
            return
        self._paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        """Read the socket again, starting with what OpenSSL holds already."""
        if not self._paused or self._closing:
            return
        self._paused = False
        self._start_reading()
        if self._sock.pending():
            self._loop.call_soon(self._on_readable)

    def is_reading(self) -> bool:
        return self._reading

    # ------------------------------------------------------------ writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, or queue what the socket does not take now."""
        if self._gone or self._closing or self._eof_asked or not data:
            return
        chunk = data if type(data) is bytes else bytes(data)
        if self._pending is None and not self._queue:
            try:
                self._sock.send(chunk)
                return
            except OSError:
                pass  # the usual case's cost stays one call; _send sorts it out
            self._send(chunk)
            return
        self._queue.append(chunk)
        self._queued += len(chunk)

    def _send(self, chunk: bytes) -> bool:
        """One ``SSL_write`` of ``chunk``; True when all of it went.

        Without SSL_MODE_ENABLE_PARTIAL_WRITE (CPython does not set it), a
        write either goes whole or raises; the one that raised is retried
        with the same bytes (OpenSSL requires it).
        """
        try:
            self._sock.send(chunk)
        except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            self._pending = chunk
            self._start_writing()
            return False
        except ssl.SSLWantReadError:
            self._pending = chunk
            self._write_wants_read = True
            return False
        except OSError as exc:
            self._fatal(exc)
            return False
        self._pending = None
        return True

    def _start_writing(self) -> None:
        if not self._writing and not self._gone:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _on_writable(self) -> None:
        if self._read_wants_write:
            self._read_wants_write = False
            self._loop.call_soon(self._on_readable)
        while not self._gone:
            chunk = self._pending
            if chunk is None:
                if not self._queue:
                    break
                chunk = b"".join(self._queue)
                if len(chunk) > WRITE_CHUNK:
                    self._queue = [chunk[WRITE_CHUNK:]]
                    chunk = chunk[:WRITE_CHUNK]
                else:
                    self._queue = []
                self._queued -= len(chunk)
            if not self._send(chunk):
                return
        self._stop_writing()
        if self._gone:
            return
        if self._eof_asked and not self._eof_sent:
            self._send_eof()
        if self._closing:
            self._finish(None)

    def get_write_buffer_size(self) -> int:
        """Bytes written but not taken by the kernel yet."""
        pending = self._pending
        return self._queued + (len(pending) if pending is not None else 0)

    def _flushed(self) -> bool:
        return self._pending is None and not self._queue

    # ------------------------------------------------------------ closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """After what is queued: TLS close_notify, then a TCP FIN; reading goes on."""
        if self._eof_asked or self._closing or self._gone:
            return
        self._eof_asked = True
        if self._flushed():
            self._send_eof()

    def _send_eof(self) -> None:
        self._eof_sent = True
        self._close_notify()
        with contextlib.suppress(OSError):
            # The TCP socket's own shutdown: SSLSocket.shutdown would also
            # drop the TLS state, and with it the reading that goes on.
            socket.socket.shutdown(self._sock, socket.SHUT_WR)

    def _close_notify(self) -> None:
        # Non-blocking: sends close_notify, then raises SSLWantReadError
        # (the client's close_notify has not come); both are fine here.
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            self._sock.unwrap()

    def is_closing(self) -> bool:
        return self._closing or self._gone

    def close(self) -> None:
        """Close once everything queued is written."""
        if self._closing or self._gone:
            return
        self._closing = True
        self._stop_reading()
        if self._flushed():
            self._finish(None)

    def abort(self) -> None:
        """Close now, dropping what is queued."""
        self._finish(None, graceful=False)

    def _fatal(self, exc: Exception) -> None:
        log.debug("TLS connection failed: %r", exc)
        self._finish(exc, graceful=False)

    def _finish(self, exc: Exception | None, graceful: bool = True) -> None:
        if self._gone:
            return
        self._gone = True
        self._closing = True
        self._stop_reading()
        self._stop_writing()
        self._pending = None
        self._queue = []
        self._queued = 0
        if graceful and not self._eof_sent:
            self._close_notify()
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sslcontext":
            return self._sock.context
        if name == "peername":
            with contextlib.suppress(OSError):
                return self._sock.getpeername()
        return default
