"""What a :class:`~wsserver.session.Session` needs of the connection under it.

A Session holds one connection's logic and does no I/O of its own: it hands
:class:`Prepared` messages to a :class:`Transport` and is told about what
arrives through a :class:`Receiver`. The transport alone knows the wire
format: the WebSocket transport (the frame layer, ``wsserver.edge.fastpath``,
for ``ws://`` and ``wss://`` alike) turns a message
into an RFC 6455 frame; another transport (HTTP streaming) into an event of
its own. Tests use a recording transport and no socket at all.

A message sent to many connections (a room's publication) is prepared once:
:meth:`Prepared.encoded` builds each encoding the first time a transport asks
for it and keeps it, so a fan-out to a thousand WebSocket members builds one
frame, and a fan-out to members on two transports builds two (as Centrifuge's
``preparedDataByKey`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

#: Turns a message's JSON payload into the bytes one kind of transport writes.
#: Used as the cache key of its result, so it must be a module-level function.
Encoding = Callable[[bytes], bytes]


class Prepared:
    """One server message: its JSON payload once, and each encoding built at most once.

    Args:
        payload: the complete JSON text of one server message, UTF-8.
    """

    __slots__ = ("_first", "_first_key", "_more", "payload")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        # The first encoding in two slots (the common case: every member on
        # one transport), any others in a dict made only when needed.
        self._first_key: Encoding | None = None
        self._first = b""
        self._more: dict[Encoding, bytes] | None = None

    def __len__(self) -> int:
        """The payload's size: what the write bound counts (encodings differ a little)."""
        return len(self.payload)

    def encoded(self, encoding: Encoding) -> bytes:
        """``encoding(payload)``, built on the first call and kept for the next ones."""
        if self._first_key is encoding:
            return self._first
        if self._first_key is None:
            self._first_key = encoding
            self._first = encoding(self.payload)
            return self._first
        more = self._more
        if more is None:
            more = self._more = {}
        data = more.get(encoding)
        if data is None:
            data = more[encoding] = encoding(self.payload)
        return data

    def __repr__(self) -> str:
        return f"Prepared({self.payload[:60]!r}{'...' if len(self.payload) > 60 else ''})"


class TimerHandle(Protocol):
    """A pending callback; ``cancel()`` is idempotent."""

    def cancel(self) -> None: ...


class Transport(Protocol):
    """The connection as a Session sees it, once it is accepted."""

    #: What carries the connection (``websocket``, ``sse``): a metrics label.
    kind: str

    def send(self, message: Prepared) -> bool:
        """Queue one message (prepared once, maybe sent to many).

        Returns False when the connection is closing or closed, and nothing is
        sent. The session checks :meth:`buffered` before each send: the write
        bound (``--max-write-buffer``) is the session's, not the transport's.
        """
        ...

    def ping(self) -> None:
        """Send a keepalive the peer must answer (a WebSocket ping); the answer
        arrives as :meth:`Receiver.on_pong`. A transport whose peer cannot answer
        reports a pong itself once the keepalive is written."""
        ...

    def buffered(self) -> int:
        """Bytes accepted by :meth:`send` that the kernel has not taken yet."""
        ...

    def pause_reading(self) -> None:
        """Stop handing the receiver messages until :meth:`resume_reading`.

        What was already read stays queued in the transport, and the socket is
        no longer read, so a fast sender is slowed by TCP itself. Idempotent.
        """
        ...

    def resume_reading(self) -> None:
        """Hand the receiver what was held back, then read the socket again."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake (RFC 6455 section 7.1.2); idempotent."""
        ...

    def abort(self) -> None:
        """Cut the connection now, without a closing handshake."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` after ``delay`` seconds on the connection's loop."""
        ...


class Receiver(Protocol):
    """What a transport reports, in the order it happened on the wire."""

    def on_text(self, text: str) -> None:
        """One complete text message (already UTF-8 validated, size-checked)."""
        ...

    def on_binary(self, data: bytes) -> None:
        """One complete binary message."""
        ...

    def on_pong(self, data: bytes) -> None:
        """A pong frame arrived."""
        ...

    def on_closed(self, code: int, reason: str, by_server: bool) -> None:
        """The connection is gone; ``code`` is the one sent or received (1006: none)."""
        ...
