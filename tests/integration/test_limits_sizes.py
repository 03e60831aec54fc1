"""Sizes and liveness: big and fragmented messages, binary frames, dead peers,
slowloris requests, oversized headers, and frames pipelined behind a bad token.

Under each abuse a well-behaved client keeps being served.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable

from tests.support.aio import run
from tests.support.clients import AsyncClient, welcomed
from tests.support.metrics import read
from tests.support.raw import OP_CLOSE, OP_PING, raw_connect, text_frame, upgrade_request
from tests.support.servers import RunningServer
from tests.support.tokens import EVERY_ROOM, KEYED_ENV, bearer, mint

Start = Callable[..., RunningServer]


async def still_served(srv: RunningServer, ws: AsyncClient | None = None) -> None:
    """A well-behaved client (``ws``, or a new one) gets its echo."""
    client = ws or await welcomed(srv, mint("bystander", **EVERY_ROOM))
    assert await client.ask({"type": "echo", "data": "ok"}) == {"type": "echo", "data": "ok"}
    if ws is None:
        await client.close()


def echo(data: str) -> str:
    return json.dumps({"type": "echo", "data": data})


def test_a_message_over_max_message_size_closes_1009(run_server: Start) -> None:
    srv = run_server("--max-message-size", "1024", env=KEYED_ENV)

    async def scenario() -> None:
        bystander = await welcomed(srv, mint("bystander", **EVERY_ROOM))
        ws = await welcomed(srv, mint("alice", **EVERY_ROOM))
        fits = "x" * 900
        assert await ws.ask({"type": "echo", "data": fits}) == {"type": "echo", "data": fits}
        await ws.send(echo("x" * 2048))
        assert (await ws.until_closed())[0] == 1009
        await still_served(srv, bystander)
        await bystander.close()

    run(scenario)


def test_fragments_adding_up_past_the_limit_close_1009(run_server: Start) -> None:
    srv = run_server("--max-message-size", "1024", env=KEYED_ENV)

    async def scenario() -> None:
        ws = await welcomed(srv, mint("alice", **EVERY_ROOM))
        # Fragments within the limit make one message...
        small = echo("y" * 700)
        await ws.raw.send(iter([small[:300], small[300:600], small[600:]]))
        assert await ws.recv() == {"type": "echo", "data": "y" * 700}
        # ...and fragments each under it but together over it close the connection.
        big = echo("z" * 1500)
        await ws.raw.send(iter([big[:500], big[500:1000], big[1000:]]))
        assert (await ws.until_closed())[0] == 1009
        await still_served(srv)

    run(scenario)


def test_a_binary_frame_closes_1008(run_server: Start) -> None:
    srv = run_server(env=KEYED_ENV)

    async def scenario() -> None:
        ws = await welcomed(srv, mint("alice", **EVERY_ROOM))
        await ws.send(b"\x00\x01binary")
        assert (await ws.until_closed())[0] == 1008
        await still_served(srv)

    run(scenario)


def test_frames_pipelined_behind_an_invalid_token_are_not_processed(run_server: Start) -> None:
    """The echo is in the same TCP write as the upgrade request."""
    srv = run_server(env=KEYED_ENV)
    pipelined = text_frame({"type": "echo", "data": "sneaky", "id": 1})

    async def scenario() -> None:
        # With a valid token the same bytes are served: the client itself is sound.
        good = await raw_connect(srv, bearer(mint("alice", **EVERY_ROOM)), pipelined=pipelined)
        assert good.status == 101
        assert (await good.read_json())["type"] == "welcome"
        assert await good.read_json() == {"type": "echo", "data": "sneaky", "id": 1}
        await good.close_cleanly()

        bad = await raw_connect(srv, {"Authorization": "Bearer not.a.jwt"}, pipelined=pipelined)
        assert bad.status == 101
        code, before = await bad.read_until_close()
        assert code == 4001
        assert before == []  # no welcome, no echo
        await bad.close_cleanly_after_server_close()
        # Not even counted: the only echo the server ever handled is the good one's.
        assert await read(srv, "wsserver_messages_total", type="echo") == 1

    run(scenario)


def test_a_peer_that_does_not_answer_pings_is_closed(run_server: Start) -> None:
    """``--ping-interval 1``: silence is closed, a client that answers stays."""
    srv = run_server("--ping-interval", "1", env=KEYED_ENV)

    async def scenario() -> None:
        # websockets answers the server's pings on its own (its own pings are off).
        healthy = await welcomed(srv, mint("healthy", **EVERY_ROOM), ping_interval=None)
        silent = await raw_connect(srv, bearer(mint("silent", **EVERY_ROOM)))
        started = time.monotonic()
        assert silent.status == 101

        async def pings_until_close() -> tuple[int, bytes]:
            pings = 0
            while True:  # read everything, answer nothing
                frame = await silent.read_frame()
                if frame.opcode == OP_CLOSE:
                    return pings, frame.payload
                if frame.opcode == OP_PING:
                    pings += 1

        # Closing takes one interval to the ping and one (the timeout) for the pong.
        pings, close = await asyncio.wait_for(pings_until_close(), 5)
        assert pings >= 1
        assert close == struct.pack("!H", 1011) + b"keepalive ping timeout"
        # The server does not wait for a close frame from a peer that is not
        # listening: the socket is cut right behind the close frame.
        closed_at = time.monotonic()
        rest = await silent.wait_eof(timeout=10)
        assert rest == b"" and time.monotonic() - closed_at < 1.0
        assert time.monotonic() - started < 5
        silent.drop()
        # The healthy client lived through the same pings.
        await still_served(srv, healthy)
        await healthy.close()

    run(scenario)


def test_slowloris_requests_are_cut_off_while_real_clients_connect(run_server: Start) -> None:
    """Requests trickled a header at a time are dropped after ``--header-timeout``."""
    srv = run_server("--header-timeout", "1", env=KEYED_ENV)

    async def trickle() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        started = time.monotonic()
        writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for n in range(100):
                writer.write(f"X-Slow-{n}: 1\r\n".encode())
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.read(1024), 0.2)
                except TimeoutError:
                    continue
                assert answer == b"", answer  # no answer, just the end of the connection
                break
            else:
                raise AssertionError("the server kept a slowloris request for 20 s")
        except ConnectionError:
            pass  # writing to a connection the server closed: cut off too
        finally:
            writer.close()
        return time.monotonic() - started

    async def scenario() -> None:
        slow = [asyncio.ensure_future(trickle()) for _ in range(20)]
        await asyncio.sleep(0.3)  # let the trickling start before the real client comes
        await still_served(srv)
        assert not any(task.done() for task in slow)
        for elapsed in await asyncio.gather(*slow):
            assert 0.9 < elapsed < 5.0, elapsed
        await still_served(srv)

    run(scenario)


def test_oversized_headers_drop_the_connection(run_server: Start) -> None:
    srv = run_server("--max-header-size", "4096", env=KEYED_ENV)

    async def attempt(padding: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        headers = {**bearer(mint("alice", **EVERY_ROOM)), "X-Padding": "p" * padding}
        writer.write(upgrade_request(headers))
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except asyncio.IncompleteReadError as partial:
            return partial.partial
        finally:
            writer.close()

    async def scenario() -> None:
        assert (await attempt(2048)).startswith(b"HTTP/1.1 101 ")
        assert not (await attempt(8192)).startswith(b"HTTP/1.1 101 ")
        await still_served(srv)

    run(scenario)

