"""How the frame layer hands frames to its asyncio transport: one write per step.

A recording transport stands in for the socket's (the write policy is what is
tested; the sockets are in tests/integration/test_fastpath.py); a socket pair
takes what is written before the transport exists.
"""

from __future__ import annotations

import asyncio
import socket

from wsserver import framing
from wsserver.edge.fastpath import FrameConnection, FrameLimits


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    #: What the kernel has not taken yet (set by a test playing a peer that does not read).
    backlog = 0

    def get_write_buffer_size(self) -> int:
        return self.backlog

    reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Replier:
    """Answers every text with "re:" + text; records nothing else."""

    def __init__(self, connection: FrameConnection) -> None:
        self.connection = connection

    def on_text(self, text: str) -> None:
        self.connection.send_frame(framing.build_frame(framing.OP_TEXT, b"re:" + text.encode()))

    def on_binary(self, data: bytes) -> None:
        pass

    def on_pong(self, data: bytes) -> None:
        pass

    def on_closed(self, code: int, reason: str, by_server: bool) -> None:
        pass


def text(payload: bytes) -> bytes:
    return framing.build_frame(framing.OP_TEXT, payload)


def client_text(payload: bytes) -> bytes:
    """A masked client frame (mask of zeros: the payload reads as itself)."""
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


async def connected() -> tuple[FrameConnection, RecordingTransport]:
    connection = FrameConnection(FrameLimits())
    connection.receiver = Replier(connection)
    connection.start(b"")
    transport = RecordingTransport()
    connection.connection_made(transport)
    return connection, transport


async def next_step() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def test_frames_sent_in_one_step_leave_in_one_write_after_it() -> None:
    async def main() -> None:
        connection, transport = await connected()
        for payload in (b"a", b"b", b"c"):
            assert connection.send_frame(text(payload))
        assert transport.writes == []  # nothing written during the step
        assert connection.buffered() == 3 * len(text(b"a"))
        await next_step()
        assert transport.writes == [text(b"a") + text(b"b") + text(b"c")]
        assert connection.buffered() == 0
        connection.send_frame(text(b"d"))
        await next_step()
        assert transport.writes[1:] == [text(b"d")]

    asyncio.run(main())


def test_many_connections_are_flushed_by_one_callback_each_in_order() -> None:
    async def main() -> None:
        pairs = [await connected() for _ in range(3)]
        for round_ in range(2):
            for number, (connection, _) in enumerate(pairs):
                connection.send_frame(text(b"%d.%d" % (number, round_)))
        await next_step()
        for number, (_, transport) in enumerate(pairs):
            assert transport.writes == [text(b"%d.0" % number) + text(b"%d.1" % number)]

    asyncio.run(main())


def test_replies_to_a_read_follow_what_the_step_sent_before_it() -> None:
    async def main() -> None:
        connection, transport = await connected()
        connection.send_frame(text(b"fan-out"))
        connection.data_received(client_text(b"x") + client_text(b"y"))
        # The read's end writes everything batched so far, in the order sent.
        assert transport.writes == [text(b"fan-out") + text(b"re:x") + text(b"re:y")]
        await next_step()
        assert len(transport.writes) == 1  # the flusher found nothing left

    asyncio.run(main())


def test_a_close_frame_follows_the_batched_frames() -> None:
    async def main() -> None:
        connection, transport = await connected()
        connection.send_frame(text(b"last"))
        connection.close(4000, "bye")
        assert not connection.send_frame(text(b"too late"))
        # In order, and in one write: the batch and the close frame behind it.
        assert transport.writes == [text(b"last") + framing.close_frame(4000, "bye")]
        connection.abort()

    asyncio.run(main())


def test_what_open_sends_is_written_once_the_socket_is_connected() -> None:
    async def main() -> None:
        connection = FrameConnection(FrameLimits())
        connection.receiver = Replier(connection)
        connection.send_frame(text(b"welcome"))  # open(), before connecting
        connection.start(client_text(b"pipelined"))
        await next_step()  # the flusher runs and must keep the frame
        transport = RecordingTransport()
        connection.connection_made(transport)
        assert transport.writes == [text(b"welcome"), text(b"re:pipelined")]

    asyncio.run(main())


def test_the_101_and_what_open_sent_go_to_the_socket_before_it_is_connected() -> None:
    async def main() -> None:
        here, peer = socket.socketpair()
        with here, peer:
            connection = FrameConnection(FrameLimits(), b"HTTP/1.1 101 ...\r\n\r\n")
            connection.receiver = Replier(connection)
            connection.send_frame(text(b"welcome"))  # open(), before connecting
            connection.start(b"")
            connection.write_before_connected(here)
            assert peer.recv(1000) == b"HTTP/1.1 101 ...\r\n\r\n" + text(b"welcome")
            transport = RecordingTransport()
            connection.connection_made(transport)
            assert transport.writes == []  # nothing left to write

    asyncio.run(main())


def test_what_the_socket_did_not_take_before_it_was_connected_is_written_first() -> None:
    async def main() -> None:
        here, peer = socket.socketpair()
        with here, peer:
            here.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            big = text(b"w" * 60000)
            connection = FrameConnection(FrameLimits(), b"101\r\n\r\n")
            connection.receiver = Replier(connection)
            connection.send_frame(big)
            connection.start(b"")
            connection.write_before_connected(here)
            taken = b""
            while True:
                try:
                    taken += peer.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
            assert 0 < len(taken) < len(big)  # the kernel took a part
            transport = RecordingTransport()
            connection.connection_made(transport)
            connection.send_frame(text(b"next"))
            await next_step()
            assert taken + b"".join(transport.writes) == b"101\r\n\r\n" + big + text(b"next")

    asyncio.run(main())


def test_a_refusal_in_open_writes_its_close_frame_and_reads_nothing() -> None:
    async def main() -> None:
        connection = FrameConnection(FrameLimits())
        connection.close(4001, "invalid token")  # open() refused; no receiver
        connection.start(client_text(b"never read"))
        transport = RecordingTransport()
        connection.connection_made(transport)
        assert transport.writes == [framing.close_frame(4001, "invalid token")]
        assert transport.closed  # write_eof: a lingering close
        connection.data_received(client_text(b"late"))
        assert transport.writes == [framing.close_frame(4001, "invalid token")]
        connection.abort()

    asyncio.run(main())


def test_a_connection_gone_before_the_flush_writes_nothing() -> None:
    async def main() -> None:
        connection, transport = await connected()
        connection.send_frame(text(b"lost"))
        connection.connection_lost(None)
        await next_step()
        assert transport.writes == []

    asyncio.run(main())


class Pausing(Replier):
    """Answers like Replier, and pauses the connection after every ``every`` messages."""

    def __init__(self, connection: FrameConnection, every: int) -> None:
        super().__init__(connection)
        self.every = every
        self.seen: list[str] = []

    def on_text(self, text: str) -> None:
        super().on_text(text)
        self.seen.append(text)
        if len(self.seen) % self.every == 0:
            self.connection.pause_reading()


def test_a_paused_connection_holds_the_rest_of_a_read_and_stops_reading() -> None:
    """Back-pressure: what a read brought after the pause is kept, in order, and the
    socket is not read again until resume_reading() hands it over."""

    async def main() -> None:
        connection, transport = await connected()
        receiver = connection.receiver = Pausing(connection, every=2)
        connection.data_received(b"".join(client_text(b"%d" % i) for i in range(5)))
        assert receiver.seen == ["0", "1"]
        assert not transport.reading
        connection.resume_reading()  # hands over 2, 3 and pauses again
        assert receiver.seen == ["0", "1", "2", "3"]
        assert not transport.reading
        connection.resume_reading()
        assert receiver.seen == ["0", "1", "2", "3", "4"]
        assert transport.reading
        # Replies left in the order the messages came, nothing lost on the way.
        await next_step()
        assert b"".join(transport.writes) == b"".join(text(b"re:%d" % i) for i in range(5))

    asyncio.run(main())


def test_a_close_while_paused_still_reads_the_peers_close_frame() -> None:
    """Once the server closes, held messages are dropped but the peer's close is read."""

    async def main() -> None:
        connection, transport = await connected()
        receiver = connection.receiver = Pausing(connection, every=1)
        close = bytes([0x88, 0x82]) + b"\0\0\0\0" + b"\x03\xe8"
        connection.data_received(client_text(b"a") + client_text(b"b") + close)
        assert receiver.seen == ["a"]
        connection.close(1000, "bye")
        assert receiver.seen == ["a"]  # "b" came after the pause, and the server closed
        assert transport.closed  # the peer's close was read and answered: TCP ends

    asyncio.run(main())


def test_pings_are_not_answered_past_the_write_bound() -> None:
    """Issue 20: with --ping-interval 0 a peer could ping without reading and grow its
    backlog without end; past --max-write-buffer its pings go unanswered."""

    async def main() -> None:
        connection = FrameConnection(FrameLimits(max_write_buffer=1000))
        connection.receiver = Replier(connection)
        connection.start(b"")
        transport = RecordingTransport()
        connection.connection_made(transport)
        ping = bytes([0x89, 0x80 | 2]) + b"\0\0\0\0" + b"hi"
        connection.data_received(ping)
        assert transport.writes == [framing.pong_frame(b"hi")]
        transport.backlog = 1000
        connection.data_received(ping * 3)
        assert transport.writes == [framing.pong_frame(b"hi")]  # nothing more

    asyncio.run(main())
