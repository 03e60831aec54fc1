"""Hub: frame-once fan-out, the publisher's own copy, recovery on join, gap repair.

Sessions over recording transports (see :mod:`tests.support.sessions`) and a MemoryBroker
subclass the test controls: it can hold the next history read until the test
lets it go, drop chosen offsets on their way to the hub (a lost pub/sub
message), or fail history reads (a broker outage).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tests.support.aio import run
from tests.support.metrics import value
from tests.support.sessions import (
    Client,
    Scheduler,
    make_services,
    settle,
    start,
    turns,
    wall0,
    welcomed,
)
from tests.support.tokens import mint
from wsserver.brokers.base import (
    BrokerSink,
    BrokerUnavailable,
    HistoryPage,
    HistorySpec,
    NodeStats,
    Publication,
)
from wsserver.brokers.memory import MemoryBroker
from wsserver.services import Services

ROOM = "hist:r"
SPEC = HistorySpec(5, 60)


def rooms(size: int = 5, ttl: float = 60) -> dict[str, Any]:
    return {"join": "anyone", "publish": "members",
            "namespaces": {"hist": {"join": "anyone", "publish": "members",
                                    "history_size": size, "history_ttl": ttl}}}


class _DroppingSink:
    """The hub as the broker sees it, minus the offsets the test drops."""

    def __init__(self, sink: BrokerSink, broker: ControlledBroker) -> None:
        self._sink = sink
        self._broker = broker

    def on_publication(self, publication: Publication) -> None:
        if publication.offset in self._broker.drop:
            return
        if self._broker.delayed is not None:
            self._broker.delayed.append(publication)
            return
        self._sink.on_publication(publication)

    def on_disconnect(self, user: str, code: int, reason: str) -> None:
        self._sink.on_disconnect(user, code, reason)

    def on_presence_lost(self, room: str, user: str) -> None:
        self._sink.on_presence_lost(room, user)

    def on_resubscribed(self, rooms: Sequence[str]) -> None:
        self._sink.on_resubscribed(rooms)

    def node_stats(self) -> NodeStats:
        return self._sink.node_stats()


class ControlledBroker(MemoryBroker):
    """A MemoryBroker whose history reads and deliveries the test controls."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__("test-node", clock)
        self.drop: set[int] = set()
        #: Publications stored but not delivered yet (a slow pub/sub), when not None.
        self.delayed: list[Publication] | None = None
        self.fail_history = False
        self.history_calls: list[tuple[str, int | None, int | None]] = []
        #: Set by :meth:`hold_next_read`: the next read waits on ``release``.
        self._hold: tuple[str, asyncio.Event, asyncio.Event] | None = None

    def hold_next_read(self, when: str) -> tuple[asyncio.Event, asyncio.Event]:
        """Hold the next history read ``before`` or ``after`` it reads the stream.

        Returns (reading, release): ``reading`` is set once the read waits, the
        test sets ``release`` to let it finish.
        """
        reading, release = asyncio.Event(), asyncio.Event()
        self._hold = (when, reading, release)
        return reading, release

    async def start(self, sink: BrokerSink) -> None:
        self.sink = sink
        await super().start(_DroppingSink(sink, self))

    def deliver_delayed(self) -> None:
        """Hand the hub the delayed publications, in order, and stop delaying."""
        delayed, self.delayed = self.delayed or [], None
        for publication in delayed:
            self.sink.on_publication(publication)

    async def history(
        self, room: str, history: HistorySpec, *, since: int | None = None,
        limit: int | None = None,
    ) -> HistoryPage:
        self.history_calls.append((room, since, limit))
        if self.fail_history:
            raise BrokerUnavailable()
        hold, self._hold = self._hold, None
        if hold is not None and hold[0] == "before":
            hold[1].set()
            await hold[2].wait()
        page = await super().history(room, history, since=since, limit=limit)
        if hold is not None and hold[0] == "after":
            hold[1].set()
            await hold[2].wait()
        return page


def make(
    rooms_table: dict[str, Any] | None = None, **flags: str
) -> tuple[Services, Scheduler, ControlledBroker]:
    services, scheduler = make_services(
        rooms_table or rooms(), lambda s: ControlledBroker(s.monotonic), **flags)
    assert isinstance(services.broker, ControlledBroker)
    services.hub.delivery.repair_retry = services.hub.delivery.catch_up_retry = 0
    return services, scheduler, services.broker


async def publish_api(services: Services, data: Any, room: str = ROOM) -> None:
    await services.hub.publish(room, data)


def datas(messages: list[dict[str, Any]]) -> list[Any]:
    return [m.get("data") for m in messages]


# --- fan-out -------------------------------------------------------------------


def test_a_publication_is_one_frame_for_every_member() -> None:
    async def scenario() -> None:
        services, scheduler, broker = make()
        await broker.start(services.hub)
        clients = [await welcomed(services, scheduler, mint(f"u{i}", now=wall0()), f"10.0.0.{i}")
                   for i in range(4)]
        outsider = await welcomed(services, scheduler, mint("out", now=wall0()), "10.0.1.1")
        for client in clients:
            await client.send({"type": "join", "room": "lobby"})
        clients[0].session.on_text('{"type": "publish", "room": "lobby", "data": "hi"}')
        await settle(services)
        shared = [c.transport.frames[-1] for c in clients]
        assert all(frame is shared[0] for frame in shared)  # the same bytes object
        assert outsider.transport.frames == []
        assert value(services.metrics.deliveries) == 4

    run(scenario)


def test_only_the_publisher_gets_the_copy_with_its_id() -> None:
    async def scenario() -> None:
        services, scheduler, broker = make()
        await broker.start(services.hub)
        alice = await welcomed(services, scheduler, mint("alice", now=wall0()))
        bob = await welcomed(services, scheduler, mint("bob", now=wall0()), "10.0.0.2")
        carol = await welcomed(services, scheduler, mint("carol", now=wall0()), "10.0.0.3")
        for client in (alice, bob, carol):
            await client.send({"type": "join", "room": "lobby"})
        base = {"type": "message", "room": "lobby", "from": "alice", "data": 1}
        assert await alice.send({"type": "publish", "room": "lobby", "data": 1, "id": "m1"}) == [
            {**base, "id": "m1"}]
        assert bob.transport.take() == [base] and carol.transport.take() == [base]
        assert bob.transport.frames == []
        # Without an id the publisher shares everyone's frame.
        alice.session.on_text('{"type": "publish", "room": "lobby", "data": 2}')
        await settle(services)
        assert alice.transport.frames[-1] is bob.transport.frames[-1]
        assert alice.transport.take() == bob.transport.take() == [{**base, "data": 2}]
        # An id that needs escaping stays valid JSON.
        replies = await alice.send({"type": "publish", "room": "lobby", "data": 3,
                                    "id": 'q"\\é'})
        assert replies == [{**base, "data": 3, "id": 'q"\\é'}]
        assert services.hub.delivery._origins == {}

    run(scenario)


def test_offsets_and_epochs_only_in_history_rooms() -> None:
    async def scenario() -> None:
        services, scheduler, broker = make()
        await broker.start(services.hub)
        client = await welcomed(services, scheduler)
        assert await client.ask({"type": "join", "room": "plain"}) == {
            "type": "joined", "room": "plain"}
        joined = await client.ask({"type": "join", "room": ROOM, "id": 1})
        epoch = joined["epoch"]
        assert joined == {"type": "joined", "room": ROOM, "epoch": epoch, "offset": 0, "id": 1}
        for n in range(3):
            client.session.on_text(json.dumps({"type": "publish", "room": ROOM, "data": n}))
            client.session.on_text(json.dumps({"type": "publish", "room": "plain", "data": n}))
        await settle(services)
        messages = client.transport.take()
        hist = [m for m in messages if m["room"] == ROOM]
        plain = [m for m in messages if m["room"] == "plain"]
        assert [(m["offset"], m["epoch"]) for m in hist] == [(1, epoch), (2, epoch), (3, epoch)]
        assert all("offset" not in m and "epoch" not in m for m in plain) and len(plain) == 3
        # Joining again answers the position.
        again = await client.ask({"type": "join", "room": ROOM})
        assert (again["epoch"], again["offset"]) == (epoch, 3)

    run(scenario)


# --- recovery on join ------------------------------------------------------------


async def room_with(services: Services, count: int) -> tuple[str, Client]:
    """A publisher member of ROOM and ``count`` messages published; the epoch."""
    scheduler = Scheduler()
    publisher = await welcomed(services, scheduler, mint("pub", now=wall0()), "10.9.9.9")
    joined = await publisher.ask({"type": "join", "room": ROOM})
    for n in range(1, count + 1):
        await publish_api(services, n)
    publisher.transport.take()
    return joined["epoch"], publisher


@pytest.mark.parametrize(
    ("since", "recovered", "expected"),
    [
        (8, True, []),  # since = top
        (7, True, [8]),
        (3, True, [4, 5, 6, 7, 8]),  # top - size: the oldest kept is 4
        (2, False, []),  # 3 was trimmed
        (0, False, []),
        (9, False, []),  # beyond the top: not a position this epoch had
    ],
)
def test_recovery_boundaries(since: int, recovered: bool, expected: list[int]) -> None:
    async def scenario() -> None:
        services, scheduler, broker = make(rooms(size=5), max_recovery="10")
        await broker.start(services.hub)
        epoch, _ = await room_with(services, 8)
        client = await welcomed(services, scheduler)
        answer = await client.ask({"type": "join", "room": ROOM, "id": 1,
                                   "since": {"offset": since, "epoch": epoch}})
        assert {k: v for k, v in answer.items() if k != "messages"} == {
            "type": "joined", "room": ROOM, "epoch": epoch, "offset": 8,
            "recovered": recovered, "id": 1}
        assert datas(answer["messages"]) == expected
        for n, message in zip(expected, answer["messages"], strict=True):
            assert message == {"type": "message", "room": ROOM, "from": None, "data": n,
                               "offset": n, "epoch": epoch}
        outcome = "recovered" if recovered else "lost"
        assert value(services.metrics.recoveries, outcome=outcome) == 1
        await publish_api(services, "live")
        assert client.transport.take() == [{"type": "message", "room": ROOM, "from": None,
                                            "data": "live", "offset": 9, "epoch": epoch}]

    run(scenario)


def test_recovery_from_another_epoch_is_refused() -> None:
    async def scenario() -> None:
        services, scheduler, broker = make()
        await broker.start(services.hub)
        epoch, _ = await room_with(services, 3)
        client = await welcomed(services, scheduler)
        answer = await client.ask({"type": "join", "room": ROOM,
                                   "since": {"offset": 3, "epoch": "other"}})
        assert (answer["recovered"], answer["messages"], answer["epoch"], answer["offset"]) == (
            False, [], epoch, 3)

    run(scenario)


@pytest.mark.parametrize(("missed", "recovered"), [(3, True), (4, False)])
def test_more_than_max_recovery_is_not_recovered(missed: int, recovered: bool) -> None:
    async def scenario() -> None:
        services, scheduler, broker = make(rooms(size=10), max_recovery="3")
        await broker.start(services.hub)
        epoch, _ = await room_with(services, 6)
        client = await welcomed(services, scheduler)
        answer = await client.ask({"type": "join", "room": ROOM,
                                   "since": {"offset": 6 - missed, "epoch": epoch}})
        assert answer["recovered"] is recovered
        assert len(answer["messages"]) == (missed if recovered else 0)
        assert broker.history_calls[-1] == (ROOM, 6 - missed, 4)  # max_recovery + 1

    run(scenario)


def test_live_messages_during_the_read_are_recovered_once() -> None:
    """Published after the subscribe, before the stream is read: in the answer only."""
    async def scenario() -> None:
        services, scheduler, broker = make()
        await broker.start(services.hub)
        epoch, _ = await room_with(services, 2)
        client = await welcomed(services, scheduler)
        reading, release = broker.hold_next_read("before")
        client.session.on_text(json.dumps(
            {"type": "join", "room": ROOM, "since": {"offset": 1, "epoch": epoch}}))
        await reading.wait()
        assert client.session in services.hub.members(ROOM)  # subscribed first
        await publish_api(services, 3)
        await publish_api(services, 4)
        assert client.transport.frames == []  # held until the answer
        release.set()
        await settle(services)
        await publish_api(services, 5)
        messages = client.transport.take()
        assert [m["type"] for m in messages] == ["joined", "message"]
        assert messages[0]["recovered"] is True
        assert datas(messages[0]["messages"]) == [2, 3, 4]
        assert messages[1]["offset"] == 5

    run(scenario)


@pytest.mark.parametrize("since", [True, False], ids=["since", "plain"])
def test_live_messages_after_the_read_follow_the_answer_in_order(since: bool) -> None:
    """Published after the stream was read, before the answer: after it, once, in order."""
    async def scenario() -> None:
        services, scheduler, broker = make()
        await broker.start(services.hub)
        epoch, _ = await room_with(services, 2)
        client = await welcomed(services, scheduler)
        reading, release = broker.hold_next_read("after")
        join: dict[str, Any] = {"type": "join", "room": ROOM}
        if since:
            join["since"] = {"offset": 1, "epoch": epoch}
        client.session.on_text(json.dumps(join))
        await reading.wait()
        await publish_api(services, 3)
        await publish_api(services, 4)
        assert client.transport.frames == []
        release.set()
        await settle(services)
        messages = client.transport.take()
        assert messages[0]["type"] == "joined" and messages[0]["offset"] == 2
        if since:
            assert datas(messages[0]["messages"]) == [2]
        assert [(m["type"], m["offset"]) for m in messages[1:]] == [("message", 3), ("message", 4)]

    run(scenario)


@pytest.mark.parametrize("with_member", [False, True], ids=["first-member", "second-member"])
def test_an_epoch_change_during_the_join_is_not_hidden_by_the_answer(with_member: bool) -> None:
    """The read saw the old epoch, a live message has the new one: after the answer
    (never before it), a gap, then the message."""
    async def scenario() -> None:
        services, scheduler, broker = make(rooms(size=5, ttl=10))
        await broker.start(services.hub)
        client = await welcomed(services, scheduler)
        if with_member:
            (member,) = await members_of_room(services, 1)
        old = (await broker.publish(ROOM, b'{"type":"message","data":0}',
                                    history=HistorySpec(5, 10))).epoch
        reading, release = broker.hold_next_read("after")
        client.session.on_text(json.dumps({"type": "join", "room": ROOM}))
        await reading.wait()
        scheduler.advance(11)  # the room's history expires: a new epoch
        await publish_api(services, "new")
        release.set()
        await settle(services)
        messages = client.transport.take()
        assert messages[0] == {"type": "joined", "room": ROOM, "epoch": old, "offset": 1}
        new = messages[-1]["epoch"]
        assert new != old
        assert messages[1:] == [
            {"type": "gap", "room": ROOM, "epoch": new, "offset": 0, "recovered": False},
            {"type": "message", "room": ROOM, "from": None, "data": "new", "offset": 1,
             "epoch": new},
        ]
        if with_member:
            assert member.transport.take()[-2:] == messages[1:]

    run(scenario)


def test_a_failed_history_read_leaves_no_member_and_no_presence() -> None:
    async def scenario() -> None:
        services, scheduler, broker = make()
        await broker.start(services.hub)
        client = await welcomed(services, scheduler)
        broker.fail_history = True
        reply = await client.ask({"type": "join", "room": ROOM, "id": 1})
        assert reply["code"] == "unavailable" and reply["id"] == 1
        await settle(services)
        assert services.hub.members(ROOM) == []
        assert (await broker.presence(ROOM)).connections == 0
        assert ROOM not in broker._subscribed
        broker.fail_history = False
        assert (await client.ask({"type": "join", "room": ROOM}))["type"] == "joined"

    run(scenario)


def test_a_close_during_the_join_read_leaves_nothing_and_announces_nothing() -> None:
    async def scenario() -> None:
        table = rooms()
        table["namespaces"]["hist"]["join_leave"] = True
        services, scheduler, broker = make(table)
        await broker.start(services.hub)
        watcher = await welcomed(services, scheduler, mint("watcher", now=wall0()), "10.0.0.9")
        await watcher.send({"type": "join", "room": ROOM})
        watcher.transport.take()
        client = await welcomed(services, scheduler)
        reading, release = broker.hold_next_read("before")
        client.session.on_text(json.dumps({"type": "join", "room": ROOM}))
        await reading.wait()
        client.gone()
        release.set()
        await settle(services)
        # Never a user_joined for a user already gone (its user_left may come).
        events = [(m["type"], m["user"]) for m in watcher.transport.take()]
        assert ("user_joined", "alice") not in events
        assert services.hub.members(ROOM) == [watcher.session]
        assert (await broker.presence(ROOM)).users == ["watcher"]

    run(scenario)


def test_a_close_during_the_subscribe_leaves_no_subscription() -> None:
    async def scenario() -> None:
        services, scheduler, broker = make()
        await broker.start(services.hub)
        client = await welcomed(services, scheduler)
        client.session.on_text(json.dumps({"type": "join", "room": "lonely"}))
        client.gone()
        await settle(services)
        assert "lonely" not in broker._subscribed
        assert "lonely" not in services.hub._subscriptions

    run(scenario)


# --- gap repair on the node --------------------------------------------------------


async def members_of_room(services: Services, count: int = 2) -> list[Client]:
    scheduler = Scheduler()
    clients = [await welcomed(services, scheduler, mint(f"m{i}", now=wall0()), f"10.1.0.{i}")
               for i in range(count)]
    for client in clients:
        await client.send({"type": "join", "room": ROOM})
    return clients


def offsets(client: Client) -> list[int]:
    return [m["offset"] for m in client.transport.take() if m["type"] == "message"]


def test_a_lost_publication_is_read_from_history_once_and_delivered_in_order() -> None:
    async def scenario() -> None:
        services, _, broker = make()
        await broker.start(services.hub)
        clients = await members_of_room(services)
        await publish_api(services, 1)
        broker.drop = {2}
        reads = len(broker.history_calls)
        await publish_api(services, 2)  # lost on its way to this node
        await publish_api(services, 3)  # offset last + 2: the node repairs
        await settle(services)
        await publish_api(services, 4)
        for client in clients:
            assert offsets(client) == [1, 2, 3, 4]
        assert broker.history_calls[reads:] == [(ROOM, 1, None)]
        assert value(services.metrics.gap_repairs, outcome="repaired") == 1

    run(scenario)


def test_on_publication_beyond_the_next_offset_repairs() -> None:
    async def scenario() -> None:
        services, _, broker = make()
        await broker.start(services.hub)
        clients = await members_of_room(services)
        await publish_api(services, 1)
        broker.drop = {2, 3}
        await publish_api(services, 2)
        await publish_api(services, 3)
        page = await broker.history(ROOM, SPEC, since=2)
        services.hub.on_publication(page.publications[0])  # offset 3, the node is at 1
        await settle(services)
        for client in clients:
            assert offsets(client) == [1, 2, 3]

    run(scenario)


def test_publications_during_a_repair_are_held_and_delivered_once() -> None:
    async def scenario() -> None:
        services, _, broker = make(rooms(size=10))
        await broker.start(services.hub)
        (client,) = await members_of_room(services, 1)
        await publish_api(services, 1)
        broker.drop = {2}
        await publish_api(services, 2)
        reading, release = broker.hold_next_read("after")
        await publish_api(services, 3)  # starts the repair
        await reading.wait()
        await publish_api(services, 4)  # after the repair's read: held
        assert offsets(client) == [1]
        release.set()
        await settle(services)
        assert offsets(client) == [2, 3, 4]

    run(scenario)


def test_a_range_gone_from_history_tells_the_members_only_what_is_gone() -> None:
    """The gap covers 2 and 3 (trimmed); 4 and 5, still kept, are delivered."""
    async def scenario() -> None:
        services, _, broker = make(rooms(size=2))
        await broker.start(services.hub)
        clients = await members_of_room(services)
        await publish_api(services, 1)
        epoch = clients[0].transport.messages()[-1]["epoch"]
        broker.drop = {2, 3, 4}
        for n in (2, 3, 4, 5):
            await publish_api(services, n)  # 5 arrives; 2 and 3 are trimmed
        await settle(services)
        await publish_api(services, 6)
        for client in clients:
            assert client.transport.take()[-4:] == [
                {"type": "gap", "room": ROOM, "epoch": epoch, "offset": 3, "recovered": False},
                *({"type": "message", "room": ROOM, "from": None, "data": n, "offset": n,
                   "epoch": epoch} for n in (4, 5, 6)),
            ]
        assert value(services.metrics.gap_repairs, outcome="lost") == 1

    run(scenario)


def test_an_epoch_change_tells_the_members() -> None:
    async def scenario() -> None:
        services, scheduler, broker = make(rooms(size=5, ttl=10))
        await broker.start(services.hub)
        (client,) = await members_of_room(services, 1)
        await publish_api(services, 1)
        old = client.transport.take()[-1]["epoch"]
        scheduler.advance(11)
        await publish_api(services, 2)
        await settle(services)  # the new epoch's history is read: what it kept is not lost
        gap, message = client.transport.take()
        new = message["epoch"]
        assert new != old
        assert gap == {"type": "gap", "room": ROOM, "epoch": new, "offset": 0,
                       "recovered": False}
        assert (message["offset"], message["data"]) == (1, 2)

    run(scenario)


def test_a_resubscription_repairs_without_a_trigger() -> None:
    async def scenario() -> None:
        services, _, broker = make()
        await broker.start(services.hub)
        (client,) = await members_of_room(services, 1)
        await publish_api(services, 1)
        broker.drop = {2, 3}
        await publish_api(services, 2)
        await publish_api(services, 3)
        services.hub.on_resubscribed([ROOM])
        await settle(services)
        assert offsets(client) == [1, 2, 3]

    run(scenario)


def test_a_failed_repair_read_is_retried_by_the_next_publication() -> None:
    async def scenario() -> None:
        services, _, broker = make()
        await broker.start(services.hub)
        (client,) = await members_of_room(services, 1)
        await publish_api(services, 1)
        broker.drop = {2}
        await publish_api(services, 2)
        broker.fail_history = True
        services.hub.on_resubscribed([ROOM])
        await settle(services)  # the read fails; nothing arrived meanwhile
        broker.fail_history = False
        broker.drop = set()
        await publish_api(services, 3)
        await settle(services)
        assert offsets(client) == [1, 2, 3]

    run(scenario)


# --- round 3: nothing lost silently -------------------------------------------------


def test_a_join_does_not_hide_messages_from_the_members_already_there() -> None:
    """The join race: a message is in the history before its pub/sub delivery. A
    join's read sees it; the members already in the room must still get it (and
    the joiner, whose answer covered it, must not get it twice)."""
    async def scenario() -> None:
        services, scheduler, broker = make()
        await broker.start(services.hub)
        (member,) = await members_of_room(services, 1)
        await publish_api(services, 1)
        broker.delayed = []  # the pub/sub lags behind the history
        await publish_api(services, 2)
        await publish_api(services, 3)
        joiner = await welcomed(services, scheduler, mint("joiner", now=wall0()), "10.2.0.1")
        answer = await joiner.ask({"type": "join", "room": ROOM})
        assert answer["offset"] == 3
        broker.deliver_delayed()
        await publish_api(services, 4)
        await settle(services)
        assert offsets(member) == [1, 2, 3, 4]
        assert offsets(joiner) == [4]

    run(scenario)


def test_a_lagging_member_catches_up_from_the_history_in_order() -> None:
    """Past the write bound a member is not closed: once drained it gets what it
    skipped, read from the history, then live messages, each once, in order."""
    async def scenario() -> None:
        services, _, broker = make(rooms(size=50), max_write_buffer="4000")
        await broker.start(services.hub)
        reader, other = await members_of_room(services, 2)
        await publish_api(services, "a")
        reader.transport.backlog = 3_990  # the reader stops reading
        for _ in range(2, 8):
            await publish_api(services, "b")
        await turns()
        assert reader.transport.closes == []
        assert offsets(reader) == [1]
        assert offsets(other) == [1, 2, 3, 4, 5, 6, 7]
        assert services.hub.lagging(reader.session, ROOM)
        reader.transport.backlog = 0
        reader.transport.scheduler.advance(0.1)
        await settle(services)
        await publish_api(services, "live")
        assert offsets(reader) == [2, 3, 4, 5, 6, 7, 8]
        assert not services.hub.lagging(reader.session, ROOM)
        assert value(services.metrics.slow_consumers) == 0

    run(scenario)


def test_a_lagging_member_is_told_what_the_history_no_longer_has() -> None:
    async def scenario() -> None:
        services, _, broker = make(rooms(size=3), max_write_buffer="4000")
        await broker.start(services.hub)
        (reader,) = await members_of_room(services, 1)
        await publish_api(services, 1)
        epoch = reader.transport.messages()[-1]["epoch"]
        reader.transport.backlog = 3_990
        for n in range(2, 9):  # 2..8; the history keeps 6, 7, 8
            await publish_api(services, n)
        reader.transport.take()
        reader.transport.backlog = 0
        reader.transport.scheduler.advance(0.1)
        await settle(services)
        got = reader.transport.take()
        assert got[0] == {"type": "gap", "room": ROOM, "epoch": epoch, "offset": 5,
                          "recovered": False}
        assert [m["offset"] for m in got[1:]] == [6, 7, 8]

    run(scenario)


def test_a_lagging_publisher_gets_its_own_copy_with_its_id_from_the_history() -> None:
    async def scenario() -> None:
        services, _, broker = make(rooms(size=50), max_write_buffer="4000")
        await broker.start(services.hub)
        (publisher,) = await members_of_room(services, 1)
        publisher.transport.backlog = 3_990
        publisher.session.on_text(json.dumps(
            {"type": "publish", "room": ROOM, "data": "mine", "id": "p1"}))
        await turns()
        assert publisher.transport.frames == []
        publisher.transport.backlog = 0
        publisher.transport.scheduler.advance(0.1)
        await settle(services)
        (copy,) = publisher.transport.take()
        assert (copy["data"], copy["id"], copy["offset"]) == ("mine", "p1", 1)

    run(scenario)


def test_a_recovery_larger_than_the_write_bound_is_paced_not_closed() -> None:
    """The answer carries what fits with "pending"; the rest follows as messages,
    each under the bound, before any live one."""
    async def scenario() -> None:
        services, scheduler, broker = make(rooms(size=100), max_write_buffer="2000")
        await broker.start(services.hub)
        epoch, _ = await room_with(services, 0)
        for _ in range(1, 41):
            await publish_api(services, "x" * 100)
        client = await welcomed(services, scheduler)
        sent: list[int] = []
        real_send = client.transport.send

        def counting_send(message: Any) -> bool:
            sent.append(client.transport.backlog)
            client.transport.backlog += len(message.payload)
            return real_send(message)

        client.transport.send = counting_send  # type: ignore[method-assign]
        client.session.on_text(json.dumps(
            {"type": "join", "room": ROOM, "since": {"offset": 0, "epoch": epoch}}))
        await turns()
        (answer,) = client.transport.take()
        assert answer["recovered"] is True and answer["offset"] == 40
        inline = len(answer["messages"])
        assert 0 < inline < 40 and answer["pending"] == 40 - inline
        for _ in range(100):
            if len(client.transport.messages()) + inline >= 40:
                break
            client.transport.backlog = 0  # the client reads
            scheduler.advance(0.1)
            await turns()
        await publish_api(services, "live")
        await settle(services)
        rest = client.transport.take()
        assert [m["offset"] for m in answer["messages"] + rest] == list(range(1, 42))
        assert client.transport.closes == []
        assert max(sent) <= 2000

    run(scenario)


@pytest.mark.parametrize(("since", "recovered"), [(7, True), (5, False)])
def test_a_recovery_past_max_recovery_bytes_is_not_recovered(since: int, recovered: bool) -> None:
    """Each message is about 260 bytes: 3 fit in 1000 bytes, 5 do not."""
    async def scenario() -> None:
        services, scheduler, broker = make(rooms(size=100), max_recovery_bytes="1000")
        await broker.start(services.hub)
        epoch, _ = await room_with(services, 0)
        for _ in range(10):
            await publish_api(services, "x" * 200)
        client = await welcomed(services, scheduler)
        answer = await client.ask({"type": "join", "room": ROOM,
                                   "since": {"offset": since, "epoch": epoch}})
        assert answer["recovered"] is recovered
        assert len(answer["messages"]) == (10 - since if recovered else 0)

    run(scenario)


def test_after_a_history_loss_the_gap_covers_only_what_is_gone() -> None:
    """Redis restarted without persistence while this node's subscription was down:
    the new epoch's messages still in the history are delivered, and the gap only
    says that the old epoch's tail is gone (offset 0 of the new one)."""
    async def scenario() -> None:
        services, scheduler, broker = make(rooms(size=10, ttl=10))
        await broker.start(services.hub)
        (member,) = await members_of_room(services, 1)
        await publish_api(services, 1)
        old = member.transport.take()[-1]["epoch"]
        scheduler.advance(11)  # the history is lost: the next publish starts a new epoch
        broker.drop = {1, 2}  # and this node misses its first two messages
        for n in (1, 2, 3):
            await publish_api(services, n)
        await settle(services)
        got = member.transport.take()
        new = got[-1]["epoch"]
        assert new != old
        assert got[0] == {"type": "gap", "room": ROOM, "epoch": new, "offset": 0,
                          "recovered": False}
        assert [(m["offset"], m["epoch"]) for m in got[1:]] == [(1, new), (2, new), (3, new)]

    run(scenario)


def test_presence_checks_the_grant_before_saying_it_is_not_enabled() -> None:
    """A user who may not join a room learns nothing of its namespace's settings."""
    async def scenario() -> None:
        table = {"join": "token", "publish": "token",
                 "namespaces": {"secret": {"join": "none", "presence": False}}}
        services, scheduler = make_services(table)
        await start(services)
        client = await welcomed(services, scheduler)
        reply = await client.ask({"type": "presence", "room": "secret:x"})
        assert reply["code"] == "forbidden"

    run(scenario)


def test_a_rooms_publishes_are_also_bounded_in_bytes() -> None:
    """One publisher of big messages within the message rate still cannot push more
    than --room-publish-bytes (burst twice that) into every member's link."""
    async def scenario() -> None:
        services, _, broker = make(room_publish_bytes="10000")
        await broker.start(services.hub)
        (publisher,) = await members_of_room(services, 1)
        replies = []
        for n in range(5):
            replies += await publisher.send(
                {"type": "publish", "room": ROOM, "data": "x" * 5000, "id": n})
        errors = [r for r in replies if r["type"] == "error"]
        assert len(replies) - len(errors) == 3  # 20,000 bytes of burst: three of ~5.1 kB
        assert errors[0]["code"] == "rate_limited" and errors[0]["retry_after"] > 0
        assert value(services.metrics.rejections, reason="room_rate") == 2

    run(scenario)


def test_join_and_leave_events_are_charged_to_the_rooms_bucket() -> None:
    """A join/leave loop must not flood a big room: past the room's publish bucket
    the events are shed (counted), the joins themselves go on."""
    async def scenario() -> None:
        table = rooms()
        table["namespaces"]["hist"]["join_leave"] = True
        services, scheduler, broker = make(table, room_publish_rate="1",
                                           room_publish_burst="4")
        await broker.start(services.hub)
        (watcher,) = await members_of_room(services, 1)
        watcher.transport.take()
        for n in range(6):
            churner = await welcomed(services, scheduler, mint(f"c{n}", now=wall0()),
                                     f"10.3.0.{n}")
            assert (await churner.send({"type": "join", "room": ROOM}))[0]["type"] == "joined"
            await churner.send({"type": "leave", "room": ROOM})
        await settle(services)
        events = [m["type"] for m in watcher.transport.take()]
        # The burst of 4 less the watcher's own user_joined: 3 of the 12, then shed.
        assert events == ["user_joined", "user_left", "user_joined"]
        assert value(services.metrics.rejections, reason="room_event_shed") == 9

    run(scenario)


def test_a_broker_that_went_back_in_time_gets_a_new_epoch_and_members_a_gap() -> None:
    """Redis lost its last writes (a failover to a replica that had not got them):
    offsets this node delivered would be given out again to other messages, which
    members would drop as repeats. The repair sees the top below its position and
    starts a new epoch; the members are told."""
    async def scenario() -> None:
        services, _, broker = make()
        await broker.start(services.hub)
        (member,) = await members_of_room(services, 1)
        for n in range(1, 6):
            await publish_api(services, n)
        old = member.transport.take()[-1]["epoch"]
        stream = broker._streams[ROOM]  # Redis comes back with only offsets 1..3
        stream.top = 3
        while stream.kept and (stream.kept[-1].offset or 0) > 3:
            stream.kept.pop()
        services.hub.on_resubscribed([ROOM])
        await settle(services)
        await publish_api(services, "after")
        got = member.transport.take()
        new = got[0]["epoch"]
        assert new != old
        assert got == [
            {"type": "gap", "room": ROOM, "epoch": new, "offset": 0, "recovered": False},
            {"type": "message", "room": ROOM, "from": None, "data": "after", "offset": 1,
             "epoch": new},
        ]

    run(scenario)


def test_a_leave_while_the_broker_is_down_is_answered_left() -> None:
    """Found by the chaos suite: a leave was answered 'unavailable' although the
    member had already left locally (a second leave then said 'left')."""
    async def scenario() -> None:
        services, scheduler, broker = make()
        await broker.start(services.hub)
        client = await welcomed(services, scheduler)
        await client.send({"type": "join", "room": ROOM})

        async def down(room: str, user: str) -> bool:
            raise BrokerUnavailable()

        broker.presence_remove = down  # type: ignore[method-assign]
        assert await client.ask({"type": "leave", "room": ROOM, "id": 2}) == {
            "type": "left", "room": ROOM, "id": 2}
        assert services.hub.members(ROOM) == []

    run(scenario)
