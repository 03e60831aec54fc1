"""One server-side WebSocket connection without I/O: its state and its closing handshake.

:class:`ServerConnection` is what python-websockets' ``Protocol`` is to its
connections: the state (:class:`State`), the frames parsed from the bytes
read (:meth:`ServerConnection.receive_data`), what to answer to each control
frame, the close codes each way, and what to do with TCP once the last frame
is out (:class:`Ending`). It never touches a socket or a timer: the caller
(``wsserver.edge.fastpath.FrameConnection``, the same for ``ws://`` and
``wss://``) writes the bytes it returns and arms the timers it asks for. Its
tests run in milliseconds, without a socket.

Messages become frames here too (:meth:`ServerConnection.encoding`), plain or
compressed as the handshake negotiated (RFC 7692).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from wsserver import framing
from wsserver.closecodes import CloseCode
from wsserver.deflate import Deflate
from wsserver.framing import Close, Event, Failure, FrameParser
from wsserver.transport import Encoding


class State(enum.IntEnum):
    """Where a connection is (as python-websockets' ``State``)."""

    #: The 101 is decided; the server's ``open()`` accepts or refuses.
    #: Frames sent meanwhile follow the 101; nothing is read yet.
    CONNECTING = 0
    #: Accepted: messages flow both ways.
    OPEN = 1
    #: A close frame was sent or received (or the connection failed):
    #: nothing more is sent but the handshake's answer, no message is handed on.
    CLOSING = 2
    #: TCP is gone.
    CLOSED = 3


#: The members as module constants (looked up on the class, a member costs a
#: few hundred nanoseconds; the per-frame paths compare with these).
CONNECTING, OPEN, CLOSING, CLOSED = State.CONNECTING, State.OPEN, State.CLOSING, State.CLOSED


class Ending(enum.Enum):
    """What the caller does with TCP once the frames returned so far are written."""

    #: The server closed first: read on, waiting ``close_timeout`` for the
    #: client's close frame (then close TCP), else cut.
    AWAIT_CLOSE = "await_close"
    #: The client's close frame arrived (and was answered): close TCP now;
    #: nothing follows a close frame (RFC 6455 section 5.5.1), so no unread
    #: input can turn the close into a reset.
    CLOSE = "close"
    #: Failed, or refused before it was accepted: send a FIN after the close
    #: frame, read and drop whatever still comes until the client's FIN (or
    #: ``close_timeout``). Closing a socket with unread input makes the kernel
    #: answer with a reset, which can destroy the close frame before the
    #: client reads it (and with it the 4001 that tells it to get a new token).
    LINGER = "linger"


class ServerConnection:
    """The protocol side of one connection, after the 101 (RFC 6455 sections 5 and 7).

    Args:
        parser: the connection's frame parser (its limits, and the inflater
            when permessage-deflate was negotiated).
        deflate: the negotiated permessage-deflate parameters, or None.
        compression_threshold: messages shorter than this many bytes go
            uncompressed even when compression was negotiated.
    """

    __slots__ = (
        "_threshold",
        "_window",
        "close_received",
        "close_sent",
        "compressed_encoding",
        "ending",
        "parser",
        "receive_data",
        "server_closed_first",
        "state",
    )

    def __init__(
        self,
        parser: FrameParser,
        deflate: Deflate | None = None,
        compression_threshold: int = 256,
    ) -> None:
        self.parser = parser
        #: ``receive_data(data)``: the frames the bytes read complete (nothing
        #: once a close is received or the connection failed). The caller hands
        #: each event, in order, to :meth:`ping_received`,
        #: :meth:`close_received_frame`, :meth:`failed`, or, for a message or a
        #: pong while :attr:`delivers`, to the application. The parser's own
        #: ``feed``, bound here: no call in between on the per-read path.
        self.receive_data: Callable[[bytes], list[Event]] = parser.feed
        self.state = CONNECTING
        #: What to do with TCP once the output is written (None: keep it open).
        self.ending: Ending | None = None
        #: (code, reason) of the close frame sent, and of the one received.
        self.close_sent: tuple[int, str] | None = None
        self.close_received: tuple[int, str] | None = None
        #: True when the server's close frame went first (it decided the code).
        self.server_closed_first = False
        #: The encoding of a compressed message, or None (no compression).
        self.compressed_encoding: Encoding | None = (
            framing.DEFLATED_TEXT[deflate.server_window_bits] if deflate is not None else None
        )
        self._threshold = compression_threshold
        self._window = deflate.server_window_bits if deflate is not None else 15

    # ------------------------------------------------------------- sending

    @property
    def can_send(self) -> bool:
        """True while messages may be sent (CONNECTING or OPEN)."""
        return self.state <= OPEN

    def encoding(self, size: int) -> Encoding:
        """How a text message of ``size`` bytes goes out on this connection:
        compressed when negotiated and ``size`` reaches the threshold."""
        compressed = self.compressed_encoding
        if compressed is None or size < self._threshold:
            return framing.text_message
        return compressed

    def encode_data(self, data: bytes, binary: bool) -> bytes:
        """One message's frame, built for this connection alone."""
        if self.compressed_encoding is None or len(data) < self._threshold:
            return framing.build_frame(framing.OP_BINARY if binary else framing.OP_TEXT, data)
        if binary:
            return framing.DEFLATED_BINARY[self._window](data)
        return self.compressed_encoding(data)

    # ------------------------------------------------------------- receiving

    @property
    def delivers(self) -> bool:
        """True while messages and pongs go to the application (OPEN only)."""
        return self.state is OPEN

    def ping_received(self, data: bytes) -> bytes | None:
        """The pong to send (RFC 6455 section 5.5.3), or None once closing."""
        if self.state > OPEN:
            return None
        return framing.pong_frame(data)

    def close_received_frame(self, close: Close) -> bytes | None:
        """The client's close frame: record it, answer it unless the server
        closed first (echoing its code, section 5.5.1; an empty close answers
        one without a code), and close TCP (:attr:`ending`)."""
        self.close_received = (close.code, close.reason)
        frame = None
        if self.close_sent is None:
            frame = self._send_close(close.code, "")
        self.state = max(self.state, CLOSING)
        self.ending = Ending.CLOSE
        return frame

    def failed(self, failure: Failure) -> bytes | None:
        """The client broke the protocol or a limit (section 7.1.7): the close
        frame carrying the failure's code (1002, 1007, 1008, 1009), unless a
        close frame went out already; then a lingering close."""
        frame = None
        if self.close_sent is None:
            frame = self._send_close(failure.code, failure.reason)
            self.server_closed_first = True
        self.ending = Ending.LINGER
        return frame

    def fragment_expired(self, now: float) -> bytes | None:
        """The fragment timer fired at ``now``: the close frame of a failure
        (1008) when the fragmented message is still unfinished, else None."""
        if self.state > OPEN or not self.parser.fragment_expired(now):
            return None
        self.parser.done = True
        return self.failed(Failure(CloseCode.POLICY, "fragmented message not finished in time"))

    # ------------------------------------------------------------- closing

    def close(self, code: int, reason: str) -> bytes | None:
        """The server closes (section 7.1.2): the close frame to send, or None
        when a close frame already went either way. Then :attr:`ending` is
        AWAIT_CLOSE: the client's close frame is read as usual."""
        if self.state > OPEN:
            return None
        frame = self._send_close(code, reason)
        self.server_closed_first = True
        self.ending = Ending.AWAIT_CLOSE
        return frame

    def accepted(self, accepted: bool) -> bytes | None:
        """``open()`` returned: OPEN when it accepted (and did not close).

        A refused connection (no receiver) is closed with 1011 unless
        ``open()`` closed it already, and its TCP connection lingers: what the
        client pipelined behind its handshake is never parsed.
        """
        frame = None
        if not accepted:
            frame = self.close(CloseCode.INTERNAL, "") if self.state is CONNECTING else None
            self.ending = Ending.LINGER
            return frame
        if self.state is CONNECTING:
            self.state = OPEN
        return frame

    def connection_lost(self, aborted_by_server: bool) -> tuple[int, str, bool]:
        """TCP is gone: CLOSED, and the ``(code, reason, by_server)`` to report.

        The server's code when it closed first; else the client's; else 1006
        (no close frame either way), by the server when it cut the connection.
        """
        self.state = CLOSED
        if self.server_closed_first and self.close_sent is not None:
            return self.close_sent[0], self.close_sent[1], True
        if self.close_received is not None:
            return self.close_received[0], self.close_received[1], False
        return 1006, "", aborted_by_server

    def _send_close(self, code: int, reason: str) -> bytes:
        self.close_sent = (code, reason)
        self.state = CLOSING
        # 1005 is never sent (RFC 6455 section 7.4.1): an empty close answers it.
        return framing.close_frame(None if code == 1005 else code, reason)
