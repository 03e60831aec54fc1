"""Slow readers lag, they are not thrown out; fast publishers are slowed, not cut off
(docs/protocol.md, "What a client can count on: nothing lost silently").

A reader that stops reading keeps its connection: the room's broadcast goes on
for everyone else without waiting for it, the server's memory stays bounded,
and once it reads again it gets what it skipped (from the history, or a
``gap``). 4009 stays for a peer that reads nothing for
``--slow-consumer-timeout`` seconds, or whose own replies overflow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.aio import run
from tests.support.clients import AsyncClient, welcomed
from tests.support.metrics import read
from tests.support.raw import OP_CLOSE, OP_PING, OP_TEXT, RawConnection, raw_connect, text_frame
from tests.support.servers import RunningServer
from tests.support.tokens import EVERY_ROOM, KEYED_ENV, bearer, mint

Start = Callable[..., RunningServer]

MAX_WRITE_BUFFER = 256 * 1024
MESSAGE_DATA = "m" * (32 * 1024)
PUBLISHED = 400  # 12.5 MiB in all, far past every buffer between server and reader
#: RSS the server may gain while the reader is stalled: a bound well under what
#: holding the stalled reader's backlog would take.
RSS_GROWTH_LIMIT = 12 * 1024 * 1024
UNLIMITED = ("--message-rate", "100000", "--message-burst", "100000",
             "--room-publish-rate", "100000", "--room-publish-burst", "100000",
             "--room-publish-bytes", "0")
ROOMS = """
[rooms]
join = "token"
publish = "token"

[rooms.namespaces.hist]
join = "token"
publish = "token"
history_size = 1000
"""


def rss_bytes(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


def reset_peak_rss(pid: int) -> None:
    """Make ``VmHWM`` start again from the current RSS (proc(5), clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def server(run_server: Start, tmp_path: Path, *extra: str) -> RunningServer:
    config = tmp_path / "rooms.toml"
    config.write_text(ROOMS)
    return run_server("--config", str(config), "--max-write-buffer", str(MAX_WRITE_BUFFER),
                      *UNLIMITED, *extra, env=KEYED_ENV)


async def receive_messages(ws: AsyncClient, count: int) -> int:
    """Read until ``count`` room messages have arrived; how many arrived."""
    got = 0
    while got < count:
        message = await ws.recv()
        assert message is not None, f"closed: {ws.close_code}"
        if message["type"] == "message":
            got += 1
    return got


async def stalled_member(srv: RunningServer, room: str) -> RawConnection:
    """A member of ``room`` with a tiny receive window, which then stops reading."""
    stalled = await raw_connect(srv, bearer(mint("stalled", **EVERY_ROOM)), rcvbuf=4096)
    assert stalled.status == 101
    assert (await stalled.read_json())["type"] == "welcome"
    await stalled.send(text_frame({"type": "join", "room": room}))
    assert (await stalled.read_json())["type"] == "joined"
    return stalled


async def publish_past_the_stalled_reader(
    srv: RunningServer, room: str, *, bounded_memory: bool
) -> AsyncClient:
    """Publish PUBLISHED messages into ``room``; the publisher's copies and another
    member's reads must go on at full speed (nobody waits for the stalled one).

    ``bounded_memory``: check the server did not keep the stalled reader's
    backlog (in a room without history; with history, the history itself is
    what the server keeps, bounded by ``history_size``).
    """
    publisher = await welcomed(srv, mint("publisher", **EVERY_ROOM))
    member = await welcomed(srv, mint("member", **EVERY_ROOM))
    for ws in (publisher, member):
        assert (await ws.ask({"type": "join", "room": room}))["type"] == "joined"
    member_reads = asyncio.ensure_future(receive_messages(member, PUBLISHED))
    before = rss_bytes(srv.pid, "VmRSS")
    reset_peak_rss(srv.pid)
    for n in range(PUBLISHED):
        await publisher.send({"type": "publish", "room": room, "data": MESSAGE_DATA, "id": n})
        copy = await publisher.recv()
        assert copy is not None and (copy["type"], copy["id"]) == ("message", n), copy
    assert await asyncio.wait_for(member_reads, 30) == PUBLISHED
    peak_growth = rss_bytes(srv.pid, "VmHWM") - before
    if bounded_memory:
        assert peak_growth < RSS_GROWTH_LIMIT, f"server RSS grew {peak_growth >> 20} MiB"
    assert await read(srv, "wsserver_lagging_members") == 1
    await member.close()
    return publisher


async def read_room(conn: RawConnection, until: Any) -> list[dict[str, Any]]:
    """Room messages and gaps read by ``conn`` up to the message whose data is ``until``."""
    got: list[dict[str, Any]] = []
    while True:
        frame = await conn.read_frame(timeout=30)
        if frame.opcode == OP_PING:
            continue
        assert frame.opcode == OP_TEXT, f"closed: {frame}"
        message = frame.json()
        if message.get("data") == until:
            return got
        got.append(message)


def test_a_stalled_reader_lags_and_then_gets_every_message_from_the_history(
    run_server: Start, tmp_path: Path
) -> None:
    """A room with history: nothing is lost, nothing is repeated, nothing is closed."""
    srv = server(run_server, tmp_path)

    async def scenario() -> None:
        stalled = await stalled_member(srv, "hist:r")
        publisher = await publish_past_the_stalled_reader(srv, "hist:r", bounded_memory=False)
        await publisher.send({"type": "publish", "room": "hist:r", "data": "end"})
        got = await read_room(stalled, "end")
        assert [m["type"] for m in got] == ["message"] * PUBLISHED
        assert [m["offset"] for m in got] == list(range(1, PUBLISHED + 1))
        assert await read(srv, "wsserver_lagging_members") == 0
        assert await read(srv, "wsserver_slow_consumer_disconnects_total") == 0
        # Still a member, live again.
        await publisher.send({"type": "publish", "room": "hist:r", "data": "after"})
        assert (await stalled.read_json())["data"] == "after"
        await stalled.close_cleanly()
        await publisher.close()

    run(scenario)


def test_a_stalled_reader_without_history_is_told_how_many_it_missed(
    run_server: Start, tmp_path: Path
) -> None:
    """At most once, never silently: what was queued before it lagged, then a
    ``gap`` with the number dropped, then live messages."""
    srv = server(run_server, tmp_path)

    async def scenario() -> None:
        stalled = await stalled_member(srv, "plain")
        publisher = await publish_past_the_stalled_reader(srv, "plain", bounded_memory=True)
        delivered = []
        while True:  # what was queued before it lagged, then the gap
            message = await stalled.read_json()
            if message["type"] == "gap":
                break
            delivered.append(message["data"])
        assert message == {"type": "gap", "room": "plain", "dropped": PUBLISHED - len(delivered)}
        assert 0 < len(delivered) < PUBLISHED
        await publisher.send({"type": "publish", "room": "plain", "data": "after"})
        assert (await stalled.read_json())["data"] == "after"  # live again
        assert await read(srv, "wsserver_slow_consumer_disconnects_total") == 0
        await stalled.close_cleanly()
        await publisher.close()

    run(scenario)


def test_a_peer_that_reads_nothing_is_closed_after_the_slow_consumer_timeout(
    run_server: Start, tmp_path: Path
) -> None:
    srv = server(run_server, tmp_path, "--slow-consumer-timeout", "1", "--ping-interval", "0")

    async def scenario() -> None:
        stalled = await stalled_member(srv, "plain")
        publisher = await welcomed(srv, mint("publisher", **EVERY_ROOM))
        await publisher.join("plain")
        for n in range(250):  # 8 MiB: more than the kernel's socket buffers hold
            await publisher.send({"type": "publish", "room": "plain", "data": MESSAGE_DATA,
                                  "id": n})
            assert (await publisher.recv() or {}).get("id") == n
        line = srv.wait_for_log(r"slow consumer user=stalled .*read nothing for 1 s", 10)
        assert "closing 4009" in line.string
        assert await read(srv, "wsserver_closes_total", code="4009") == 1
        stalled.discard()
        assert await publisher.ask({"type": "ping"}) == {"type": "pong"}
        await publisher.close()

    run(scenario)


def test_replies_that_overflow_close_4009(run_server: Start, tmp_path: Path) -> None:
    """Its own replies are the one thing a reader cannot skip: past twice the write
    bound, the connection is closed as a slow consumer."""
    srv = server(run_server, tmp_path)

    async def scenario() -> None:
        conn = await raw_connect(srv, bearer(mint("echoer", **EVERY_ROOM)), rcvbuf=4096)
        assert (await conn.read_json())["type"] == "welcome"
        echo = text_frame({"type": "echo", "data": "e" * 60_000})
        for _ in range(200):  # 12 MB of replies, never read: past every socket buffer
            conn.writer.write(echo)
        await conn.writer.drain()
        srv.wait_for_log(r"slow consumer user=echoer .*replies past the write bound", 10)
        code = None
        while code is None:
            frame = await conn.read_frame(timeout=10)
            if frame.opcode == OP_CLOSE:
                code = frame.close_code
        assert code == 4009
        conn.discard()

    run(scenario)


def test_a_pipelining_publisher_is_slowed_down_not_cut_off(
    run_server: Start, tmp_path: Path
) -> None:
    """Back-pressure (point 3): 300 publishes sent back to back without reading a
    reply, far past the session's queue: all are published, in order, every reply
    arrives with its id, and the connection stays open (no 4029)."""
    srv = server(run_server, tmp_path)
    count = 300

    async def scenario() -> None:
        member = await welcomed(srv, mint("member", **EVERY_ROOM))
        await member.join("hist:p")
        conn = await raw_connect(srv, bearer(mint("bot", **EVERY_ROOM)))
        assert (await conn.read_json())["type"] == "welcome"
        await conn.send(text_frame({"type": "join", "room": "hist:p"}))
        assert (await conn.read_json())["type"] == "joined"
        burst = b"".join(
            text_frame({"type": "publish", "room": "hist:p", "data": n, "id": n})
            for n in range(count)
        )
        conn.writer.write(burst)
        await conn.writer.drain()
        replies = [await conn.read_json() for _ in range(count)]
        assert [(m["type"], m["id"], m["data"]) for m in replies] == [
            ("message", n, n) for n in range(count)]
        seen = [await member.recv() for _ in range(count)]
        assert [m["data"] for m in seen if m] == list(range(count))
        assert [m["offset"] for m in seen if m] == list(range(1, count + 1))
        assert await read(srv, "wsserver_closes_total", code="4029") == 0
        await conn.close_cleanly()
        await member.close()

    run(scenario)
