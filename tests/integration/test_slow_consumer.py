"""A client that stops reading is closed with 4009, memory stays bounded, and the
room's broadcast goes on for everyone else without waiting for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from tests.support.aio import run
from tests.support.clients import AsyncClient, welcomed
from tests.support.metrics import read
from tests.support.raw import OP_TEXT, raw_connect, text_frame
from tests.support.servers import RunningServer
from tests.support.tokens import EVERY_ROOM, KEYED_ENV, bearer, mint

Start = Callable[..., RunningServer]

MAX_WRITE_BUFFER = 256 * 1024
MESSAGE_DATA = "m" * (32 * 1024)
PUBLISHED = 1000  # 32 MiB in all, far past every buffer between server and reader
#: RSS the server may gain while the reader is stalled: a bound well under what
#: holding the stalled reader's backlog would take (tens of MiB).
RSS_GROWTH_LIMIT = 12 * 1024 * 1024


def rss_bytes(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


def reset_peak_rss(pid: int) -> None:
    """Make ``VmHWM`` start again from the current RSS (proc(5), clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def receive_messages(ws: AsyncClient, count: int) -> int:
    """Read until ``count`` room messages have arrived; how many arrived."""
    got = 0
    while got < count:
        if (await ws.recv())["type"] == "message":
            got += 1
    return got


def test_a_stalled_reader_is_closed_4009_and_the_room_goes_on(run_server: Start) -> None:
    srv = run_server(
        "--max-write-buffer", str(MAX_WRITE_BUFFER),
        "--message-rate", "100000", "--message-burst", "100000",
        "--room-publish-rate", "100000", "--room-publish-burst", "100000",
        env=KEYED_ENV,
    )

    async def scenario() -> None:
        # The stalled reader: a tiny receive window, in the room, then it stops reading.
        stalled = await raw_connect(srv, bearer(mint("stalled", **EVERY_ROOM)), rcvbuf=4096)
        assert stalled.status == 101
        assert (await stalled.read_json())["type"] == "welcome"
        await stalled.send(text_frame({"type": "join", "room": "r"}))
        assert (await stalled.read_json())["type"] == "joined"

        publisher = await welcomed(srv, mint("publisher", **EVERY_ROOM))
        member = await welcomed(srv, mint("member", **EVERY_ROOM))
        for ws in (publisher, member):
            assert (await ws.ask({"type": "join", "room": "r"}))["type"] == "joined"
        member_reads = asyncio.ensure_future(receive_messages(member, PUBLISHED))

        before = rss_bytes(srv.pid, "VmRSS")
        reset_peak_rss(srv.pid)

        async def publish() -> None:
            # Each publish waits for the publisher's own copy: were the broadcast
            # held up by the stalled member, this would stall too.
            for n in range(PUBLISHED):
                await publisher.send(
                    {"type": "publish", "room": "r", "data": MESSAGE_DATA, "id": n}
                )
                copy = await publisher.recv()
                assert (copy["type"], copy["id"]) == ("message", n), copy

        publishing = asyncio.ensure_future(publish())
        await asyncio.wait_for(asyncio.shield(publishing), 60)
        assert await asyncio.wait_for(member_reads, 30) == PUBLISHED
        peak_growth = rss_bytes(srv.pid, "VmHWM") - before
        assert peak_growth < RSS_GROWTH_LIMIT, f"server RSS grew {peak_growth >> 20} MiB"
        assert await read(srv, "wsserver_slow_consumer_disconnects_total") == 1

        # Reading now, the stalled client finds the bounded backlog, then 4009.
        # (Tornado drops the TCP connection 5 s after its close frame if not
        # answered; the publishing above takes well under that.)
        received = 0
        while True:
            frame = await stalled.read_frame()
            if frame.opcode != OP_TEXT:
                break
            assert frame.json()["type"] == "message"
            received += 1
        assert frame.close_code == 4009
        assert received < PUBLISHED
        await stalled.close_cleanly_after_server_close()
        assert await read(srv, "wsserver_closes_total", code="4009") == 1

        # Everyone else is still served.
        for ws in (publisher, member):
            assert (await ws.ask({"type": "ping"})) == {"type": "pong"}
            await ws.close()

    run(scenario)
