"""The broker contract: every broker (memory, redis) passes the same tests.

Each test runs once per broker through the ``harness`` fixture (see
conftest.py). What is checked here is what the hub and the API rely on:
delivery to subscribed rooms only, offsets, history and recovery
boundaries, idempotency, presence flags, user caps, disconnects, nodes.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.support.aio import run
from tests.support.brokers import Harness
from wsserver.brokers.base import IDEMPOTENCY_TTL, HistorySpec, PublishResult, with_position
from wsserver.brokers.memory import MAX_TICKETS, MemoryBroker

KEEP5 = HistorySpec(size=5, ttl=60)


def msg(n: int) -> bytes:
    return b'{"type":"message","room":"r","data":%d}' % n


def test_delivers_to_subscribed_rooms_only(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, sink):
            await broker.subscribe("a")
            await broker.publish("b", msg(0))  # nobody subscribed here
            await broker.publish("a", msg(1))
            await sink.wait(lambda: len(sink.publications) >= 1)
            await sink.barrier(broker, "a")
            assert sink.payloads() == [msg(1), b'{"marker":1}']
            first = sink.publications[0]
            assert (first.room, first.offset, first.epoch, first.origin) == ("a", None, None, None)

            await broker.unsubscribe("a")
            await broker.publish("a", msg(2))
            await broker.subscribe("c")
            await sink.barrier(broker, "c")
            assert msg(2) not in sink.payloads()

    run(scenario())


def test_origin_passes_through(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, sink):
            await broker.subscribe("r")
            await broker.publish("r", msg(1), origin="conn 7 é")
            await broker.publish("r", msg(2), origin="", history=KEEP5)
            await broker.publish("r", msg(3))
            await sink.wait(lambda: len(sink.publications) == 3)
            assert [p.origin for p in sink.publications] == ["conn 7 é", "", None]
            assert sink.publications[1].payload.startswith(msg(2)[:-1])

    run(scenario())


def test_offsets_start_at_one_without_gaps(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, sink):
            await broker.subscribe("r")
            results = [await broker.publish("r", msg(n), history=KEEP5) for n in range(1, 8)]
            epoch = results[0].epoch
            assert epoch
            assert results == [PublishResult(n, epoch) for n in range(1, 8)]
            await sink.wait(lambda: len(sink.publications) == 7)
            assert [p.offset for p in sink.publications] == list(range(1, 8))
            assert {p.epoch for p in sink.publications} == {epoch}
            for n, publication in enumerate(sink.publications, 1):
                assert publication.payload == with_position(msg(n), n, epoch)
                assert json.loads(publication.payload)["offset"] == n

    run(scenario())


def test_without_history_no_position(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, sink):
            await broker.subscribe("r")
            assert await broker.publish("r", msg(1)) == PublishResult()
            assert await broker.publish("r", msg(2), history=HistorySpec(0, 60)) == PublishResult()
            await sink.wait(lambda: len(sink.publications) == 2)
            assert sink.payloads() == [msg(1), msg(2)]

    run(scenario())


def test_position_of_a_room_without_messages_is_kept(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            page = await broker.history("fresh", KEEP5)
            assert page.offset == 0
            assert page.publications == ()
            again = await broker.history("fresh", KEEP5, since=0)
            assert (again.epoch, again.offset, again.complete) == (page.epoch, 0, True)
            result = await broker.publish("fresh", msg(1), history=KEEP5)
            assert result == PublishResult(1, page.epoch)

    run(scenario())


def test_history_is_trimmed_to_size(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            for n in range(1, 9):
                await broker.publish("r", msg(n), history=KEEP5)
            page = await broker.history("r", KEEP5, since=0)
            assert page.offset == 8
            assert [p.offset for p in page.publications] == [4, 5, 6, 7, 8]
            assert not page.complete
            assert page.publications[0].payload == with_position(msg(4), 4, page.epoch)

    run(scenario())


@pytest.mark.parametrize(
    ("since", "limit", "offsets", "complete"),
    [
        (8, None, [], True),  # the top: nothing missed
        (3, None, [4, 5, 6, 7, 8], True),  # top - size: exactly what is kept
        (2, None, [4, 5, 6, 7, 8], False),  # too old: offset 3 is gone
        (0, None, [4, 5, 6, 7, 8], False),
        (9, None, [], False),  # beyond the top: not this stream's position
        (3, 2, [4, 5], False),  # cut by the limit
        (3, 5, [4, 5, 6, 7, 8], True),  # the limit holds everything
        (6, 2, [7, 8], True),
    ],
)
def test_recovery_boundaries(
    harness: Harness, since: int, limit: int | None, offsets: list[int], complete: bool
) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            for n in range(1, 9):
                await broker.publish("r", msg(n), history=KEEP5)
            page = await broker.history("r", KEEP5, since=since, limit=limit)
            assert page.offset == 8
            assert [p.offset for p in page.publications] == offsets
            assert page.complete is complete
            position = await broker.history("r", KEEP5)
            assert (position.epoch, position.offset, position.publications) == (page.epoch, 8, ())

    run(scenario())


def test_expired_history_gets_a_new_epoch(harness: Harness) -> None:
    short = HistorySpec(size=5, ttl=0.3)

    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            first = await broker.publish("r", msg(1), history=short)
            await broker.publish("r", msg(2), history=short)
            await harness.elapse(0.6)
            page = await broker.history("r", short, since=1)
            assert page.epoch != first.epoch
            assert (page.offset, page.publications) == (0, [])
            # since=1 is beyond the new stream's top: the client must reload.
            assert not page.complete
            again = await broker.publish("r", msg(3), history=short)
            assert again == PublishResult(1, page.epoch)

    run(scenario())


def test_reads_do_not_extend_the_history_ttl(harness: Harness) -> None:
    """The TTL counts from the room's last message: a join (a position read) or a
    recovery read every half TTL must not keep the history forever."""
    short = HistorySpec(size=5, ttl=0.6)

    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            first = await broker.publish("r", msg(1), history=short)
            for _ in range(3):
                await harness.elapse(0.25)
                await broker.history("r", short)
                await broker.history("r", short, since=0)
            page = await broker.history("r", short, since=1)
            assert page.epoch != first.epoch
            assert (page.offset, page.publications, page.complete) == (0, [], False)

    run(scenario())


@pytest.mark.parametrize("since", [2**63 - 1, 2**64 - 1, 2**64, 10**30])
def test_a_since_past_any_offset_is_not_complete_and_no_error(
    harness: Harness, since: int
) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            await broker.publish("r", msg(1), history=KEEP5)
            page = await broker.history("r", KEEP5, since=since, limit=301)
            assert (page.offset, list(page.publications), page.complete) == (1, [], False)

    run(scenario())


def test_idempotency_key_publishes_once(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, sink):
            await broker.subscribe("r")
            await broker.subscribe("s")
            first = await broker.publish("r", msg(1), history=KEEP5, idempotency_key="k1")
            again = await broker.publish("r", msg(9), history=KEEP5, idempotency_key="k1")
            assert first == PublishResult(1, first.epoch)
            assert again == PublishResult(1, first.epoch, duplicate=True)
            other = await broker.publish("s", msg(2), history=KEEP5, idempotency_key="k1")
            assert other.offset == 1  # another room: another key
            plain = await broker.publish("r", msg(3), idempotency_key="k2")
            assert plain == PublishResult()
            assert await broker.publish("r", msg(4), idempotency_key="k2") == PublishResult(
                duplicate=True)
            await sink.barrier(broker, "r")
            assert [p for p in sink.payloads("r") if b"marker" not in p] == [
                with_position(msg(1), 1, first.epoch), msg(3)
            ]
            page = await broker.history("r", KEEP5, since=0)
            assert [p.offset for p in page.publications] == [1]

    run(scenario())


def test_presence_counts_and_first_last_flags(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            assert await broker.presence_add("r", "u1") is True
            assert await broker.presence_add("r", "u1") is False
            assert await broker.presence_add("r", "u2") is True
            assert await broker.presence_add("s", "u1") is True
            presence = await broker.presence("r")
            assert (presence.users, presence.connections) == (["u1", "u2"], 3)
            rooms = await broker.rooms()
            assert {r: (c.connections, c.users) for r, c in rooms.items()} == {
                "r": (3, 2), "s": (1, 1)
            }
            assert await broker.presence_remove("r", "u1") is False
            assert await broker.presence_remove("r", "u1") is True
            assert await broker.presence_remove("r", "u1") is False  # not there any more
            assert await broker.presence_remove("r", "u2") is True
            assert (await broker.presence("r")).users == []
            assert (await broker.presence("r")).connections == 0
            assert set(await broker.rooms()) == {"s"}

    run(scenario())


def test_user_connect_limit(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            assert await broker.user_connect("u", 2) == 1
            assert await broker.user_connect("u", 2) == 2
            assert await broker.user_connect("u", 2) is None
            assert await broker.user_connections(["u", "v"]) == {"u": 2, "v": 0}
            await broker.user_disconnect("u")
            assert await broker.user_connect("u", 2) == 2
            await broker.user_disconnect("u")
            await broker.user_disconnect("u")
            await broker.user_disconnect("u")  # one too many: stays at 0
            assert await broker.user_connections(["u"]) == {"u": 0}
            assert await broker.user_connections([]) == {}

    run(scenario())


def test_disconnect_user_reaches_the_sink(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, sink):
            await broker.disconnect_user("u1", 4003, "bye")
            await sink.wait(lambda: bool(sink.disconnects))
            assert sink.disconnects == [("u1", 4003, "bye")]

    run(scenario())


def test_nodes_include_this_one(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started("node-a") as (broker, sink):
            sink.connections, sink.users = 3, 2
            nodes = await broker.nodes()
            assert [(n.name, n.connections, n.users) for n in nodes] == [("node-a", 3, 2)]
            assert nodes[0].uptime >= 0

    run(scenario())


def test_reset_epoch_starts_over_only_from_the_stale_epoch(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            first = await broker.publish("r", msg(1), history=KEEP5)
            assert first.epoch is not None
            new = await broker.reset_epoch("r", KEEP5, first.epoch)
            assert new != first.epoch
            page = await broker.history("r", KEEP5, since=0)
            assert (page.epoch, page.offset, list(page.publications)) == (new, 0, [])
            # A second node asking with the same stale epoch keeps the new one.
            assert await broker.reset_epoch("r", KEEP5, first.epoch) == new
            assert await broker.publish("r", msg(2), history=KEEP5) == PublishResult(1, new)

    run(scenario())


# --- HTTP streaming: tickets and forwarded session messages (issue 22) ---------------


def test_a_ticket_is_taken_once(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            await broker.ticket_put("t1", "jwt-1", 30)
            await broker.ticket_put("t2", "jwt-2", 30)
            assert await broker.ticket_take("t1") == "jwt-1"
            assert await broker.ticket_take("t1") is None  # single use
            assert await broker.ticket_take("never-issued") is None
            assert await broker.ticket_take("t2") == "jwt-2"

    run(scenario())


def test_a_ticket_expires(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            await broker.ticket_put("short", "jwt", 0.3)
            await broker.ticket_put("long", "jwt-long", 30)
            await harness.elapse(0.6)
            assert await broker.ticket_take("short") is None
            assert await broker.ticket_take("long") == "jwt-long"

    run(scenario())


def test_a_ticket_issued_on_one_node_is_taken_on_another(redis_harness: Harness) -> None:
    async def scenario() -> None:
        async with redis_harness.started("a") as (a, _), redis_harness.started("b") as (b, _):
            await a.ticket_put("t", "jwt", 30)
            assert await b.ticket_take("t") == "jwt"
            assert await a.ticket_take("t") is None

    run(scenario())


class Forwarded:
    """Records what a broker hands to its node's forwarded-message handler."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str]] = []
        self.changed = asyncio.Event()

    def __call__(self, session: str, text: str) -> None:
        self.got.append((session, text))
        self.changed.set()

    async def until(self, count: int) -> list[tuple[str, str]]:
        async with asyncio.timeout(5):
            while len(self.got) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.got


def test_forward_reaches_the_node_of_the_tag_only(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.started() as (broker, _sink):
            forwarded = Forwarded()
            broker.serve_forwarded(forwarded)
            assert re.fullmatch(r"[A-Za-z0-9_-]{8}", broker.node_tag)
            assert await broker.forward(broker.node_tag, "s1", '{"type":"ping"}') is True
            assert await broker.forward(broker.node_tag, "s1", "é\nsecond") is True
            assert await forwarded.until(2) == [("s1", '{"type":"ping"}'), ("s1", "é\nsecond")]
            other_tag = "A" * 8 if broker.node_tag != "A" * 8 else "B" * 8
            assert await broker.forward(other_tag, "s1", "lost") is False

    run(scenario())


def test_forward_between_nodes_in_order(redis_harness: Harness) -> None:
    async def scenario() -> None:
        async with redis_harness.started("a") as (a, _), redis_harness.started("b") as (b, _):
            at_a, at_b = Forwarded(), Forwarded()
            a.serve_forwarded(at_a)
            b.serve_forwarded(at_b)
            assert a.node_tag != b.node_tag
            for n in range(20):
                assert await a.forward(b.node_tag, "sess", str(n)) is True
            assert await at_b.until(20) == [("sess", str(n)) for n in range(20)]
            assert at_a.got == []

    run(scenario())


def test_memory_tickets_are_bounded_oldest_first() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        for n in range(MAX_TICKETS + 1):
            await broker.ticket_put(f"t{n}", f"jwt{n}", 30)
        assert await broker.ticket_take("t0") is None  # the oldest made room
        assert await broker.ticket_take("t1") == "jwt1"
        assert await broker.ticket_take(f"t{MAX_TICKETS}") == f"jwt{MAX_TICKETS}"

    run(scenario())


def test_memory_idempotency_keys_expire_oldest_first() -> None:
    """Keys live IDEMPOTENCY_TTL: an expired one publishes again, a live one
    does not, and what expired is gone (a client can add a key per publish)."""
    now = [0.0]

    async def scenario() -> None:
        broker = MemoryBroker(clock=lambda: now[0])
        for n in range(3000):
            now[0] = n / 10  # 10 keyed publishes a second for 300 s
            await broker.publish("r", msg(n), idempotency_key=f"k{n}")
        now[0] = 299.95 + IDEMPOTENCY_TTL  # every key expired, k2999 last
        assert (await broker.publish("r", msg(0), idempotency_key="k2999")).duplicate is False
        now[0] = 300.0 + IDEMPOTENCY_TTL
        assert (await broker.publish("r", msg(1), idempotency_key="k2999")).duplicate is True
        assert len(broker._idempotent) == 1  # only the live key is kept

    run(scenario())
