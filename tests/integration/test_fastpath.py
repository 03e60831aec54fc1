"""The frame layer over real sockets, ws:// and wss://: websockets clients and a raw client.

Each test runs its own event loop with an in-process server on a free port:
the conformance echo server's handler, or a variant whose receiver records
what the transport reported. Every test that takes ``scheme`` runs twice,
over plain TCP and over TLS: both run on the same frame layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conformance.echo_server import EchoHandler, EchoReceiver
from tests.support import aio
from tests.support.deploy import write_self_signed_cert
from tests.support.raw import RawConnection, client_frame, close_payload, upgraded
from wsserver import framing
from wsserver.connection import State
from wsserver.edge.fastpath import FrameConnection, FrameLimits, UpgradeHandler

TIMEOUT = 5.0
SMALL = FrameLimits(max_message_size=1000, frame_rate=50, frame_burst=100, fragment_timeout=0.3)


class RecordingReceiver(EchoReceiver):
    """Echoes, closes on "close-me", aborts on "abort-me", and records on_closed."""

    closed: list[tuple[int, str, bool]]

    def __init__(self, transport: FrameConnection, closed: list[tuple[int, str, bool]]) -> None:
        super().__init__(transport)
        self.closed = closed

    def on_text(self, text: str) -> None:
        if text == "close-me":
            self.transport.close(4000, "asked to")
        elif text == "abort-me":
            self.transport.abort()
        else:
            super().on_text(text)

    def on_closed(self, code: int, reason: str, by_server: bool) -> None:
        self.closed.append((code, reason, by_server))


class RecordingHandler(EchoHandler):
    closed: list[tuple[int, str, bool]] = []

    def open(self, connection: FrameConnection) -> None:
        connection.receiver = RecordingReceiver(connection, self.closed)


class GreetingHandler(EchoHandler):
    """Greets every connection in open(), as the server sends its welcome."""

    def open(self, connection: FrameConnection) -> None:
        super().open(connection)
        connection.send_data(b"hello")


class RefusingHandler(EchoHandler):
    """Refuses every connection in open(), as a bad token is refused."""

    def open(self, connection: FrameConnection) -> None:
        connection.close(4001, "token missing, invalid or expired")


class TLSReportingHandler(RecordingHandler):
    """Records, for each connection, whether the frame layer carries it over TLS."""

    tls: list[bool] = []

    def open(self, connection: FrameConnection) -> None:
        super().open(connection)
        self.tls.append(connection.protocol.state is State.CONNECTING)
        connection.call_later(0, lambda: self.tls.append(connection.tls))


@dataclass(frozen=True)
class Scheme:
    """ws:// or wss://: the server's TLS context and the client's."""

    name: str
    server: ssl.SSLContext | None = None
    client: ssl.SSLContext | None = None


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=["ws", "wss"])
def scheme(request: pytest.FixtureRequest, certificate: tuple[Path, Path]) -> Scheme:
    if request.param == "ws":
        return Scheme("ws")
    cert, key = certificate
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return Scheme("wss", server, ssl.create_default_context(cafile=str(cert)))


@contextlib.asynccontextmanager
async def serving(
    handler: type[UpgradeHandler],
    limits: FrameLimits = SMALL,
    scheme: Scheme | None = None,
) -> AsyncIterator[str]:
    sockets = bind_sockets(0, "127.0.0.1")
    limited = type("Limited", (handler,), {"limits": limits})
    tls = scheme.server if scheme is not None else None
    server = HTTPServer(tornado.web.Application([(r"/.*", limited)]), ssl_options=tls)
    server.add_sockets(sockets)
    try:
        yield f"127.0.0.1:{sockets[0].getsockname()[1]}"
    finally:
        server.stop()
        await server.close_all_connections()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    aio.run(scenario, timeout=4 * TIMEOUT)


def raw(
    address: str, pipelined: bytes = b"", scheme: Scheme | None = None, **kw: Any
) -> Awaitable[RawConnection]:
    """A raw client upgraded on ``address`` (the echo servers serve every path)."""
    tls = scheme.client if scheme is not None else None
    return upgraded(address, path="/", pipelined=pipelined, tls=tls, **kw)


def client(scheme: Scheme, address: str, **kw: Any) -> Any:
    """A websockets client of ``scheme`` on ``address``."""
    return connect(f"{scheme.name}://{address}/", ssl=scheme.client, **kw)


# --- well-behaved clients ------------------------------------------------------


def test_text_binary_and_fragmented_messages_are_echoed(scheme: Scheme) -> None:
    async def scenario() -> None:
        async with serving(EchoHandler, scheme=scheme) as address:
            async with client(scheme, address) as ws:
                await ws.send("hello")
                assert await ws.recv() == "hello"
                await ws.send(b"\x00\xff")
                assert await ws.recv() == b"\x00\xff"
                await ws.send(["frag", "men", "ted"])
                assert await ws.recv() == "fragmented"
                await ws.send([b"a", b"b"])
                assert await ws.recv() == b"ab"
                await ws.send("ü" * 400)
                assert await ws.recv() == "ü" * 400
            assert ws.close_code == 1000

    run(scenario)


def test_frames_pipelined_behind_the_handshake_are_read(scheme: Scheme) -> None:
    async def scenario() -> None:
        async with serving(EchoHandler, scheme=scheme) as address:
            frames = b"".join(client_frame(framing.OP_TEXT, f"m{i}".encode()) for i in range(3))
            async with await raw(address, pipelined=frames, scheme=scheme) as conn:
                got = [await conn.read_frame() for _ in range(3)]
                assert got == [(framing.OP_TEXT, f"m{i}".encode()) for i in range(3)]

    run(scenario)


def test_the_101_and_what_open_sends_leave_in_one_segment() -> None:
    async def scenario() -> None:
        async with serving(GreetingHandler) as address, await raw(address) as conn:
            assert await conn.read_frame() == (framing.OP_TEXT, b"hello")
            segments = conn.data_segments_received()
            if segments is None:
                pytest.skip("TCP_INFO has no tcpi_data_segs_in here")
            assert segments == 1  # one send: two would be two segments

    run(scenario)


def test_pings_are_answered_with_their_payload(scheme: Scheme) -> None:
    async def scenario() -> None:
        async with (
            serving(EchoHandler, scheme=scheme) as address,
            await raw(address, scheme=scheme) as conn,
        ):
            await conn.send(client_frame(framing.OP_PING, b"are you there"))
            assert await conn.read_frame() == (framing.OP_PONG, b"are you there")

    run(scenario)


# --- the closing handshake ------------------------------------------------------


def test_client_close_is_echoed_and_reported_once(scheme: Scheme) -> None:
    async def scenario() -> None:
        RecordingHandler.closed = []
        async with (
            serving(RecordingHandler, scheme=scheme) as address,
            await raw(address, scheme=scheme) as conn,
        ):
            await conn.send(client_frame(framing.OP_CLOSE, close_payload(3001) + b"done"))
            assert (await conn.read_until_close())[0] == 3001
            assert await conn.wait_eof() == b""  # the server closes TCP first (section 7.1.1)
            await asyncio.sleep(0.05)
            assert RecordingHandler.closed == [(3001, "done", False)]

    run(scenario)


def test_server_close_waits_for_the_clients_close(scheme: Scheme) -> None:
    async def scenario() -> None:
        RecordingHandler.closed = []
        async with serving(RecordingHandler, scheme=scheme) as address:
            async with client(scheme, address) as ws:
                await ws.send("close-me")
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert ws.close_code == 4000 and ws.close_reason == "asked to"
            await asyncio.sleep(0.05)
            assert RecordingHandler.closed == [(4000, "asked to", True)]

    run(scenario)


def test_server_close_drops_a_client_that_never_answers(scheme: Scheme) -> None:
    limits = FrameLimits(max_message_size=1000, close_timeout=0.2)

    async def scenario() -> None:
        RecordingHandler.closed = []
        async with (
            serving(RecordingHandler, limits, scheme=scheme) as address,
            await raw(address, scheme=scheme) as conn,
        ):
            await conn.send(client_frame(framing.OP_TEXT, b"close-me"))
            assert (await conn.read_until_close())[0] == 4000
            started = time.monotonic()
            assert await conn.wait_eof() == b""
            assert time.monotonic() - started < 2
            assert RecordingHandler.closed == [(4000, "asked to", True)]

    run(scenario)


def test_abort_cuts_without_a_close_frame(scheme: Scheme) -> None:
    async def scenario() -> None:
        RecordingHandler.closed = []
        async with (
            serving(RecordingHandler, scheme=scheme) as address,
            await raw(address, scheme=scheme) as conn,
        ):
            await conn.send(client_frame(framing.OP_TEXT, b"abort-me"))
            assert await conn.wait_eof() == b""
            await asyncio.sleep(0.05)
            assert RecordingHandler.closed == [(1006, "", True)]

    run(scenario)


def test_a_refused_connection_is_cut_at_once_and_its_frames_are_never_read(scheme: Scheme) -> None:
    async def scenario() -> None:
        async with serving(RefusingHandler, scheme=scheme) as address:
            frames = client_frame(framing.OP_TEXT, b"never echoed") * 50
            started = time.monotonic()
            async with await raw(address, pipelined=frames, scheme=scheme) as conn:
                opcode, payload = await conn.read_frame()
                assert (opcode, payload[:2]) == (framing.OP_CLOSE, close_payload(4001))
                assert await conn.wait_eof() == b""
            assert time.monotonic() - started < 1.0

    run(scenario)


# --- protocol failures -----------------------------------------------------------

FAILURES: list[tuple[str, bytes, int]] = [
    (
        "1009 across fragments",
        client_frame(framing.OP_BINARY, b"x" * 600, fin=False)
        + client_frame(framing.OP_CONTINUATION, b"x" * 600),
        1009,
    ),
    ("invalid utf-8", client_frame(framing.OP_TEXT, b"ok \xff"), 1007),
    (
        "invalid utf-8 in a fragment",
        client_frame(framing.OP_TEXT, b"ok", fin=False)
        + client_frame(framing.OP_CONTINUATION, b"\xc3\x28"),
        1007,
    ),
    ("ping flood", client_frame(framing.OP_PING) * 150, 1008),
    (
        "continuation flood",
        client_frame(framing.OP_TEXT, b"", fin=False)
        + client_frame(framing.OP_CONTINUATION, b"", fin=False) * 150,
        1008,
    ),
    ("unmasked frame", b"\x81\x02hi", 1002),
    ("reserved opcode", client_frame(0x3), 1002),
    ("close of one byte", client_frame(framing.OP_CLOSE, b"\x03"), 1002),
    *[
        (f"close code {code}", client_frame(framing.OP_CLOSE, close_payload(code)), 1002)
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000)
    ],
]


@pytest.mark.parametrize("wire, code", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
def test_protocol_failures_close_with_their_code(wire: bytes, code: int, scheme: Scheme) -> None:
    async def scenario() -> None:
        async with (
            serving(EchoHandler, scheme=scheme) as address,
            await raw(address, scheme=scheme) as conn,
        ):
            await conn.send(wire)
            assert (await conn.read_until_close())[0] == code
            assert await conn.wait_eof() == b""

    run(scenario)


def test_an_unfinished_fragmented_message_is_closed_with_1008(scheme: Scheme) -> None:
    async def scenario() -> None:
        async with (
            serving(EchoHandler, scheme=scheme) as address,
            await raw(address, scheme=scheme) as conn,
        ):
            await conn.send(client_frame(framing.OP_TEXT, b"part one", fin=False))
            started = time.monotonic()
            assert (await conn.read_until_close())[0] == 1008
            assert 0.25 < time.monotonic() - started < 2

    run(scenario)


def test_a_legitimate_client_never_meets_the_frame_budget(scheme: Scheme) -> None:
    async def scenario() -> None:
        async with serving(EchoHandler, scheme=scheme) as address:
            async with client(scheme, address) as ws:
                for i in range(60):  # within burst: 100 frames
                    await ws.send(f"m{i}")
                    assert await ws.recv() == f"m{i}"
            assert ws.close_code == 1000

    run(scenario)


# --- one engine for both schemes ---------------------------------------------------


def test_tls_and_plain_tcp_take_the_same_frame_layer(scheme: Scheme) -> None:
    async def scenario() -> None:
        TLSReportingHandler.tls = []
        async with serving(TLSReportingHandler, scheme=scheme) as address, client(
            scheme, address
        ) as ws:
            await ws.send(f"over {scheme.name}")
            assert await ws.recv() == f"over {scheme.name}"
        # open() ran in CONNECTING, then the same FrameConnection carried it.
        assert TLSReportingHandler.tls == [True, scheme.name == "wss"]

    run(scenario)


def test_buffered_counts_what_a_client_that_does_not_read_left_unsent(scheme: Scheme) -> None:
    seen: list[int] = []

    class Filling(RecordingHandler):
        def open(self, connection: FrameConnection) -> None:
            super().open(connection)
            transport = connection
            frame = framing.binary_frame(b"x" * 65536)
            for _ in range(200):  # 12.5 MiB, more than loopback's socket buffers
                transport.send_frame(frame)
            seen.append(transport.buffered())

    async def scenario() -> None:
        RecordingHandler.closed = []
        async with (
            serving(Filling, scheme=scheme) as address,
            await raw(address, scheme=scheme) as conn,
        ):
            await asyncio.sleep(0.1)
            conn.discard()
        assert seen and seen[0] > 1 << 20

    run(scenario)


class PausingReceiver(EchoReceiver):
    """Echoes, pausing reading after every 10th message for a moment."""

    def __init__(self, connection: FrameConnection, during_pause: list[str]) -> None:
        super().__init__(connection)
        self.count = 0
        self.paused = False
        self.during_pause = during_pause

    def on_text(self, text: str) -> None:
        if self.paused:
            self.during_pause.append(text)  # must never happen
        super().on_text(text)
        self.count += 1
        if self.count % 10 == 0:
            self.paused = True
            self.transport.pause_reading()
            self.transport.call_later(0.02, self.resume)

    def resume(self) -> None:
        self.paused = False
        self.transport.resume_reading()


def test_paused_reading_holds_messages_in_order_then_resumes(scheme: Scheme) -> None:
    """Back-pressure: while the receiver has paused, nothing reaches it; what
    was read (over TLS also what OpenSSL decrypted and holds) comes after,
    in order."""
    during_pause: list[str] = []

    class Pausing(EchoHandler):
        def open(self, connection: FrameConnection) -> None:
            connection.receiver = PausingReceiver(connection, during_pause)

    async def scenario() -> None:
        limits = FrameLimits(max_message_size=1000, frame_rate=None)
        messages = [f"{i:04d}" + "x" * 200 for i in range(200)]  # 40 kB: several TLS records
        wire = b"".join(client_frame(framing.OP_TEXT, m.encode()) for m in messages)
        async with serving(Pausing, limits, scheme=scheme) as address, await raw(
            address, pipelined=wire, scheme=scheme
        ) as conn:
            got = [(await conn.read_frame()).payload.decode() for _ in messages]
            await conn.close_cleanly()  # read once the last pause ends
        assert got == messages
        assert during_pause == []

    run(scenario)


def test_both_schemes_run_on_uvloop_too(scheme: Scheme) -> None:
    """The server's default loop (``--loop auto``): uvloop's transports, and
    the TLS transport on uvloop's add_reader/add_writer."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        RecordingHandler.closed = []
        limits = FrameLimits(max_message_size=1 << 20)
        async with serving(RecordingHandler, limits, scheme=scheme) as address:
            async with client(scheme, address) as ws:
                await ws.send("a" * 5000)  # compressed both ways
                assert await ws.recv() == "a" * 5000
                await ws.send(b"\x00" * 70000)  # several TLS records
                assert await ws.recv() == b"\x00" * 70000
                await ws.send("close-me")
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert ws.close_code == 4000
            await asyncio.sleep(0.05)
            assert RecordingHandler.closed == [(4000, "asked to", True)]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 4 * TIMEOUT))


def test_a_connection_outlives_its_handler_and_a_full_collection(scheme: Scheme) -> None:
    """Nothing keeps the upgrade's handler, request and stream once open()
    returned (they cost kilobytes per connection); the socket the stream
    held must not go with them."""

    async def scenario() -> None:
        async with serving(EchoHandler, scheme=scheme) as address, client(scheme, address) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            gc.collect()
            assert not [o for o in gc.get_objects() if isinstance(o, EchoHandler)]
            await ws.send("after")
            assert await ws.recv() == "after"

    run(scenario)
