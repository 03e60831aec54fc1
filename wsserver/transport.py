"""What a :class:`~wsserver.session.Session` needs of the connection under it.

A Session holds one connection's logic and does no I/O of its own: it hands
pre-built frames to a :class:`Transport` and is told about what arrives
through a :class:`Receiver`. Two transports implement this: Tornado's
``IOStream`` (``wsserver.edge.handlers``, used for TLS) and the project's own frame
layer on an ``asyncio.Protocol`` (``wsserver.edge.fastpath``, plain TCP). Tests use
a recording transport and no socket at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    """A pending callback; ``cancel()`` is idempotent."""

    def cancel(self) -> None: ...


class Transport(Protocol):
    """The connection as a Session sees it, after the 101."""

    def send_frame(self, frame: bytes) -> bool:
        """Queue one complete, unmasked server frame (built once, maybe sent to many).

        Returns False when the connection is closing or closed, and nothing is sent.
        The session checks :meth:`buffered` before each send and closes a peer
        past ``--max-write-buffer`` as a slow consumer (4009).
        """
        ...

    def buffered(self) -> int:
        """Bytes accepted by :meth:`send_frame` that the kernel has not taken yet."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake (RFC 6455 section 7.1.2); idempotent."""
        ...

    def abort(self) -> None:
        """Cut the TCP connection now, without a closing handshake."""
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
