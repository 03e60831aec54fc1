"""Session against a recording transport and a fake clock: no socket, no Tornado loop.

Each test drives one or more Sessions over real Services (MemoryBroker, Hub,
registry, buckets, metrics) inside ``asyncio.run``; the timers a session sets
(token expiry) fire when the test advances the fake scheduler.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from tests.support.aio import run
from tests.support.metrics import value
from tests.support.sessions import Client, make_services, settle, start, turns, wall0, welcomed
from tests.support.tokens import mint
from wsserver import framing
from wsserver.services import Services
from wsserver.session import MAX_QUEUED, Session


def test_every_message_type_has_one_handler() -> None:
    from wsserver import protocol

    assert set(Session._SYNC) | set(Session._ASYNC) == protocol.MESSAGE_TYPES


# --- opening -----------------------------------------------------------------


def test_welcome_tells_the_user_its_expiry_and_limits() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(message_rate="5", message_burst="7")
        await start(services)
        client = Client(services, scheduler)
        assert await client.open(mint("alice", ttl=300, now=wall0()))
        (welcome,) = client.transport.take()
        assert welcome == {
            "type": "welcome", "user": "alice", "expires_at": int(wall0() + 300),
            "limits": {"message_rate": 5.0, "message_burst": 7, "max_message_size": 65536,
                       "tasks_in_flight": services.settings.task_per_connection,
                       "tasks_per_user": services.settings.task_per_user,
                       "connections_per_user": 10},
        }
        assert services.registry.authenticated == 1
        assert value(services.metrics.connections) == 1
        assert value(services.metrics.connections_accepted) == 1
        assert client.transport.closes == []

    run(scenario)


@pytest.mark.parametrize(
    "tok",
    [
        "not-a-jwt",
        mint("alice", key="another-secret-0123456789-abcdefghijklmn", now=wall0()),
        mint("alice", ttl=-10, now=wall0()),
        mint("alice", rooms="lobby", now=wall0()),  # a malformed grant claim
    ],
    ids=["garbage", "wrong-key", "expired", "bad-grants"],
)
def test_a_refused_token_closes_4001_and_frames_behind_it_are_never_read(tok: str) -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = Client(services, scheduler)
        assert not await client.open(tok)
        assert client.transport.close_code == 4001
        # Pipelined behind the refused handshake: dropped unread.
        client.session.on_text(json.dumps({"type": "echo", "data": "x"}))
        client.session.on_text(json.dumps({"type": "join", "room": "lobby"}))
        await settle(services)
        assert client.transport.messages() == []
        assert services.hub.members("lobby") == []
        assert value(services.metrics.messages, type="echo") == 0
        client.gone()
        assert services.registry.total == 0
        assert value(services.metrics.connections) == 0
        assert value(services.metrics.closes, code="4001") == 1

    run(scenario)


def test_the_per_user_cap_closes_4008_and_frees_the_slot() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(max_connections_per_user="1")
        await start(services)
        first = await welcomed(services, scheduler)
        second = Client(services, scheduler, "10.0.0.2")
        assert not await second.open(mint(now=wall0()))
        assert second.transport.close_code == 4008
        second.gone()
        first.gone(1000)
        await settle(services)
        third = Client(services, scheduler, "10.0.0.3")
        assert await third.open(mint(now=wall0()))
        assert (await services.broker.user_connections(["alice"])) == {"alice": 1}

    run(scenario)


# --- the message types -----------------------------------------------------------


def test_ping_and_echo_carry_the_id() -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler)
        assert await client.ask({"type": "ping"}) == {"type": "pong"}
        assert await client.ask({"type": "ping", "id": 7}) == {"type": "pong", "id": 7}
        data = {"nested": [1, 2.5, None, True, "é", {"deep": []}]}
        assert await client.ask({"type": "echo", "data": data, "id": "e"}) == {
            "type": "echo", "data": data, "id": "e"}
        assert value(services.metrics.messages, type="echo") == 1
        assert value(services.metrics.messages, type="ping") == 2

    run(scenario)


def test_an_unencodable_echo_is_answered_not_fatal() -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler)
        # A lone surrogate: valid JSON text, but no reply could carry it, so
        # the parser refuses it (hardening item 5) and the connection stays.
        reply = await client.ask('{"type": "echo", "data": "\\ud800", "id": 1}')
        assert reply["type"] == "error" and reply["code"] == "bad_request" and reply["id"] == 1
        assert await client.ask({"type": "ping"}) == {"type": "pong"}
        assert client.transport.closes == []

    run(scenario)


GRANTED_ROOMS: dict[str, Any] = {"join": "token", "publish": "token"}


def test_join_publish_leave_follow_the_grants() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(GRANTED_ROOMS)
        await start(services)
        alice = await welcomed(services, scheduler, mint(
            "alice", rooms=["chat:*"], publish=["chat:general"], now=wall0()))
        bob = await welcomed(services, scheduler, mint("bob", rooms=["chat:general"], now=wall0()))
        assert await alice.ask({"type": "join", "room": "chat:general", "id": 1}) == {
            "type": "joined", "room": "chat:general", "id": 1}
        assert await bob.ask({"type": "join", "room": "chat:general"}) == {
            "type": "joined", "room": "chat:general"}
        # Look-alikes and rooms outside the grant: forbidden, the connection stays.
        for room in ("chatter", "chat", "other:general"):
            reply = await alice.ask({"type": "join", "room": room, "id": 2})
            assert reply["code"] == "forbidden" and reply["id"] == 2, (room, reply)
        reply = await bob.ask({"type": "join", "room": "chat:random"})
        assert reply["code"] == "forbidden"
        # bob may read but not write; alice may write.
        reply = await bob.ask({"type": "publish", "room": "chat:general", "data": 1, "id": 3})
        assert reply == {"type": "error", "code": "forbidden",
                         "message": "not allowed to publish to 'chat:general'", "id": 3}
        replies = await alice.send(
            {"type": "publish", "room": "chat:general", "data": {"t": "hi"}, "id": 4})
        expected = {"type": "message", "room": "chat:general", "from": "alice",
                    "data": {"t": "hi"}}
        assert replies == [{**expected, "id": 4}]
        assert bob.transport.take() == [expected]
        # Not a member: a bad request, whatever the grants say.
        reply = await alice.ask({"type": "publish", "room": "chat:other", "data": 1})
        assert reply["code"] == "bad_request"
        assert await bob.ask({"type": "leave", "room": "chat:general", "id": 5}) == {
            "type": "left", "room": "chat:general", "id": 5}
        await alice.send({"type": "publish", "room": "chat:general", "data": 2})
        assert bob.transport.take() == []
        assert services.hub.members("chat:general") == [alice.session]
        assert value(services.metrics.rejections, reason="forbidden") == 5
        assert alice.transport.closes == [] and bob.transport.closes == []

    run(scenario)


def test_joining_twice_and_leaving_a_room_not_joined_are_harmless() -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler)
        assert await client.ask({"type": "join", "room": "r"}) == {"type": "joined", "room": "r"}
        assert await client.ask({"type": "join", "room": "r"}) == {"type": "joined", "room": "r"}
        assert services.hub.members("r") == [client.session]
        assert await client.ask({"type": "leave", "room": "nowhere"}) == {
            "type": "left", "room": "nowhere"}
        reply = await client.ask({"type": "join", "room": "bad\nroom"})
        assert reply["code"] == "bad_request"

    run(scenario)


TEAM_ROOMS: dict[str, Any] = {
    "join": "anyone", "publish": "members",
    "namespaces": {"team": {"join": "anyone", "publish": "members", "presence": True,
                            "join_leave": True}},
}


def test_presence_and_join_leave_events() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(TEAM_ROOMS)
        await start(services)
        alice = await welcomed(services, scheduler, mint("alice", now=wall0()))
        alice2 = await welcomed(services, scheduler, mint("alice", now=wall0()), "10.0.0.2")
        bob = await welcomed(services, scheduler, mint("bob", now=wall0()), "10.0.0.3")
        # The user's first connection in the room: one user_joined, seen by members
        # (the joiner included, after its joined).
        assert await alice.send({"type": "join", "room": "team:a"}) == [
            {"type": "joined", "room": "team:a"},
            {"type": "user_joined", "room": "team:a", "user": "alice"}]
        assert await alice2.send({"type": "join", "room": "team:a"}) == [
            {"type": "joined", "room": "team:a"}]
        await bob.send({"type": "join", "room": "team:a"})
        assert alice.transport.take() == [{"type": "user_joined", "room": "team:a",
                                           "user": "bob"}]
        assert alice2.transport.take() == [{"type": "user_joined", "room": "team:a", "user": "bob"}]
        reply = await alice.ask({"type": "presence", "room": "team:a", "id": "p"})
        assert reply == {"type": "presence", "room": "team:a", "users": ["alice", "bob"],
                         "connections": 3, "id": "p"}
        # Not where presence is off.
        reply = await alice.ask({"type": "presence", "room": "lobby"})
        assert reply["code"] == "bad_request"
        # alice's second connection goes: no user_left; its last one: user_left.
        alice2.gone(1000)
        await settle(services)
        assert bob.transport.take() == []
        await alice.send({"type": "leave", "room": "team:a"})
        await settle(services)
        assert bob.transport.take() == [{"type": "user_left", "room": "team:a",
                                         "user": "alice"}]

    run(scenario)


def test_presence_needs_a_grant() -> None:
    async def scenario() -> None:
        rooms = {"join": "token", "publish": "token",
                 "namespaces": {"team": {"join": "token", "presence": True}}}
        services, scheduler = make_services(rooms)
        await start(services)
        alice = await welcomed(services, scheduler, mint("alice", rooms=["team:a"], now=wall0()))
        eve = await welcomed(services, scheduler, mint("eve", now=wall0()), "10.0.0.2")
        await alice.send({"type": "join", "room": "team:a"})
        reply = await eve.ask({"type": "presence", "room": "team:a"})
        assert reply["code"] == "forbidden"
        reply = await alice.ask({"type": "presence", "room": "team:a"})
        assert reply["users"] == ["alice"]

    run(scenario)


def test_tasks_are_validated_then_busy_while_the_pool_is_not_running() -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler)
        reply = await client.ask({"type": "task", "name": "primes", "args": {"limit": 10},
                                  "id": 1})
        assert reply["code"] == "busy" and reply["id"] == 1
        reply = await client.ask({"type": "task", "name": "nope", "id": 2})
        assert reply["code"] == "unknown_task" and reply["id"] == 2
        reply = await client.ask({"type": "task", "name": "primes", "args": {"limit": "x"}})
        assert reply["code"] == "bad_request"
        assert client.session.tasks_in_flight == 0
        assert client.transport.closes == []

    run(scenario)


def test_refresh_moves_the_expiry() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(token_warning="10")
        await start(services)
        client = await welcomed(services, scheduler, mint("alice", ttl=60, now=wall0()))
        reply = await client.ask({"type": "refresh", "token": mint("alice", ttl=600, now=wall0()), "id": 1})
        assert reply == {"type": "refreshed", "expires_at": int(wall0() + 600), "id": 1}
        scheduler.advance(120)  # past the first token's exp
        assert client.transport.take() == [] and client.transport.closes == []
        scheduler.advance(600 - 120 - 10)
        assert [m["type"] for m in client.transport.take()] == ["token_expiring"]

    run(scenario)


@pytest.mark.parametrize(
    "new_token",
    [mint("mallory", now=wall0()), "garbage", mint("alice", ttl=-5, now=wall0())],
    ids=["another-sub", "garbage", "expired"],
)
def test_a_bad_refresh_closes_4001(new_token: str) -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler)
        assert await client.send({"type": "refresh", "token": new_token}) == []
        assert client.transport.close_code == 4001
        assert client.session.identity is not None and client.session.user == "alice"

    run(scenario)


def test_a_refresh_with_fewer_grants_leaves_those_rooms() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(GRANTED_ROOMS)
        await start(services)
        client = await welcomed(services, scheduler, mint("alice", rooms=["a", "b", "c"], now=wall0()))
        for room in ("a", "b", "c"):
            await client.send({"type": "join", "room": room})
        replies = await client.send({"type": "refresh", "token": mint("alice", rooms=["b"], now=wall0())})
        assert replies[0]["type"] == "refreshed"
        assert replies[1:] == [{"type": "left", "room": "a", "reason": "forbidden"},
                               {"type": "left", "room": "c", "reason": "forbidden"}]
        assert services.hub.rooms_of(client.session) == {"b"}
        assert services.hub.members("a") == []
        assert client.transport.closes == []

    run(scenario)


# --- bad input ---------------------------------------------------------------------

BAD_INPUTS: list[tuple[str, str]] = [
    ("not json", "bad_request"),
    ("[1, 2]", "bad_request"),
    ("{}", "bad_request"),
    ('{"type": 1}', "bad_request"),
    ('{"type": "echo"}', "bad_request"),
    ('{"type": "echo", "data": NaN}', "bad_request"),
    ('{"type": "echo", "data": ' + "[" * 100 + "]" * 100 + "}", "bad_request"),
    ('{"type": "join", "room": 3}', "bad_request"),
    ('{"type": "join", "room": "r", "since": 5}', "bad_request"),
    ('{"type": "join", "room": "r", "since": {"offset": -1, "epoch": "e"}}', "bad_request"),
    ('{"type": "join", "room": "r", "since": {"offset": 1, "epoch": ""}}', "bad_request"),
    ('{"type": "join", "room": "Bad!:x"}', "bad_request"),
    ('{"type": "publish", "room": "r"}', "bad_request"),
    ('{"type": "task", "name": "primes", "args": "x"}', "bad_request"),
    ('{"type": "refresh"}', "bad_request"),
    ('{"type": "ping", "id": [1]}', "bad_request"),
    ('{"type": "fly", "id": "q"}', "unknown_type"),
]


def test_bad_input_is_answered_and_the_connection_stays() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(message_burst="100")
        await start(services)
        client = await welcomed(services, scheduler)
        for text, code in BAD_INPUTS:
            reply = await client.ask(text)
            assert reply["type"] == "error" and reply["code"] == code, (text, reply)
            assert isinstance(reply["message"], str) and reply["message"]
        assert (await client.ask('{"type": "fly", "id": "q"}'))["id"] == "q"
        assert await client.ask({"type": "ping"}) == {"type": "pong"}
        assert client.transport.closes == []
        # Every input but the bad room name fails to parse (the room is checked later).
        assert value(services.metrics.messages, type="invalid") == len(BAD_INPUTS) - 1 + 1
        assert value(services.metrics.messages, type="join") == 1

    run(scenario)


def test_binary_closes_1008() -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler)
        client.session.on_binary(b"\x00\x01")
        assert client.transport.close_code == 1008
        client.session.on_text('{"type": "ping"}')  # closing: not served
        assert client.transport.messages() == []

    run(scenario)


def test_strikes_past_the_limit_close_4029_and_are_forgiven_after_a_refill() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(
            message_rate="1", message_burst="2", rate_limit_strikes="3")
        await start(services)
        client = await welcomed(services, scheduler)
        ping = {"type": "ping", "id": 1}
        assert await client.ask(ping) == {"type": "pong", "id": 1}
        assert await client.ask(ping) == {"type": "pong", "id": 1}
        for _ in range(3):
            reply = await client.ask(ping)
            assert reply["code"] == "rate_limited" and reply["id"] == 1
            assert reply["retry_after"] > 0
        # A full refill's time without a refusal wipes the strikes.
        scheduler.advance(2)
        assert await client.ask(ping) == {"type": "pong", "id": 1}
        assert await client.ask(ping) == {"type": "pong", "id": 1}
        for _ in range(3):
            assert (await client.ask(ping))["code"] == "rate_limited"
        assert client.transport.closes == []
        assert await client.send(ping) == []
        assert client.transport.close_code == 4029
        assert value(services.metrics.rejections, reason="rate_limited") == 7

    run(scenario)


def test_a_token_trickling_back_does_not_forgive_strikes() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(
            message_rate="1", message_burst="4", rate_limit_strikes="2")
        await start(services)
        client = await welcomed(services, scheduler)
        for _ in range(4):
            await client.send({"type": "ping"})
        assert (await client.ask({"type": "ping"}))["code"] == "rate_limited"
        for _ in range(2):
            scheduler.advance(1)  # one token back, well within the strike memory (4 s)
            assert await client.ask({"type": "ping"}) == {"type": "pong"}
            await client.send({"type": "ping"})
        assert client.transport.close_code == 4029

    run(scenario)


# --- expiry and keepalive ------------------------------------------------------------


def test_expiry_warns_then_closes_4001() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(token_warning="30")
        await start(services)
        client = await welcomed(services, scheduler, mint("alice", ttl=100, now=wall0()))
        scheduler.advance(69)
        assert client.transport.take() == []
        scheduler.advance(1)
        assert client.transport.take() == [{"type": "token_expiring",
                                            "expires_at": int(wall0() + 100)}]
        scheduler.advance(29)
        assert client.transport.closes == []
        scheduler.advance(1)
        assert client.transport.close_code == 4001
        client.gone()
        assert value(services.metrics.closes, code="4001") == 1

    run(scenario)


def test_a_short_token_is_warned_at_half_its_life() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(token_warning="60")
        await start(services)
        client = await welcomed(services, scheduler, mint("alice", ttl=20, now=wall0()))
        scheduler.advance(9.9)
        assert client.transport.take() == []
        scheduler.advance(0.1)
        assert [m["type"] for m in client.transport.take()] == ["token_expiring"]

    run(scenario)


def test_closing_cancels_the_expiry_timer() -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler, mint("alice", ttl=100, now=wall0()))
        assert len(scheduler.pending) == 1
        client.gone(1000)
        assert scheduler.pending == []

    run(scenario)


def test_keepalive_pings_a_pong_clears_and_silence_closes_1011() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(ping_interval="20")
        await start(services)
        client = await welcomed(services, scheduler)
        session, transport = client.session, client.transport
        session.keepalive(19.9, 20)
        assert transport.frames == []
        session.keepalive(20, 20)
        assert transport.frames == [framing.PING]
        session.on_pong(b"")
        session.keepalive(39, 20)
        assert transport.pings() == 1
        session.keepalive(40, 20)
        assert transport.pings() == 2
        session.keepalive(59.9, 20)  # unanswered, not yet due
        assert transport.closes == [] and not transport.aborted
        session.keepalive(60, 20)
        assert transport.close_code == 1011 and transport.aborted
        client.gone()
        assert value(services.metrics.closes, code="1011") == 1

    run(scenario)


def test_a_member_past_the_write_bound_lags_and_is_told_what_was_dropped() -> None:
    """Room traffic never closes a slow reader (4009 is for its own replies): it
    stops getting the room's messages, and once its backlog has drained it gets a
    ``gap`` saying how many it missed (a room without history), then live ones."""
    async def scenario() -> None:
        services, scheduler = make_services(max_write_buffer="10000")
        await start(services)
        reader = await welcomed(services, scheduler, mint("reader", now=wall0()))
        writer = await welcomed(services, scheduler, mint("writer", now=wall0()), "10.0.0.2")
        await reader.send({"type": "join", "room": "r"})
        await writer.send({"type": "join", "room": "r"})
        reader.transport.backlog = 9_990
        writer.session.on_text(json.dumps({"type": "publish", "room": "r", "data": "x" * 10}))
        writer.session.on_text(json.dumps({"type": "publish", "room": "r", "data": "y"}))
        await turns()  # served; the reader's catch-up now waits for its backlog
        assert reader.transport.closes == [] and reader.transport.frames == []
        assert services.hub.lagging(reader.session, "r")
        assert value(services.metrics.lagging) == 1
        # Its own replies still go, up to twice the bound.
        reader.session.on_text('{"type": "ping", "id": 1}')
        assert reader.transport.take() == [{"type": "pong", "id": 1}]
        scheduler.advance(0.1)  # looked again: not drained yet
        await turns()
        assert reader.transport.frames == []
        reader.transport.backlog = 2_000  # drained under a quarter of the bound
        scheduler.advance(0.1)
        await settle(services)
        assert reader.transport.take() == [{"type": "gap", "room": "r", "dropped": 2}]
        assert not services.hub.lagging(reader.session, "r")
        await writer.send({"type": "publish", "room": "r", "data": "z"})
        assert [m["data"] for m in reader.transport.take()] == ["z"]
        assert value(services.metrics.slow_consumers) == 0
        assert value(services.metrics.lagging) == 0

    run(scenario)


def test_replies_past_twice_the_write_bound_close_4009() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(max_write_buffer="10000")
        await start(services)
        reader = await welcomed(services, scheduler)
        reader.transport.backlog = 19_990
        await reader.send({"type": "echo", "data": "x" * 20})
        assert reader.transport.close_code == 4009
        assert reader.transport.frames == []
        assert value(services.metrics.slow_consumers) == 1

    run(scenario)


@pytest.mark.parametrize(
    ("backlogs", "closed_at"),
    [
        ([100, 100, 100, 100], 30.0),  # nothing read for 30 s
        ([100, 120, 150, 150], 30.0),  # only growing: still nothing read
        ([100, 90, 90, 90], None),  # read something at 10 s: the clock restarts
        ([100, 0, 100, 100], None),  # emptied at 10 s
    ],
)
def test_a_peer_that_reads_nothing_for_the_timeout_is_closed_4009(
    backlogs: list[int], closed_at: float | None
) -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler)
        for step, backlog in enumerate(backlogs):
            client.transport.backlog = backlog
            client.session.check_stalled(step * 10.0, 30.0)
        if closed_at is None:
            assert client.transport.closes == [] and not client.transport.aborted
        else:
            assert client.transport.close_code == 4009 and client.transport.aborted

    run(scenario)


# --- ordering ----------------------------------------------------------------------


def test_messages_behind_a_join_are_served_after_it_in_order() -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler)
        for message in (
            {"type": "join", "room": "r", "id": 1},
            {"type": "publish", "room": "r", "data": "first", "id": 2},
            {"type": "ping", "id": 3},
            {"type": "leave", "room": "r", "id": 4},
            {"type": "echo", "data": "last", "id": 5},
        ):
            client.session.on_text(json.dumps(message))
        assert client.transport.messages() == []  # the join waits on the broker
        await settle(services)
        assert [(m["type"], m["id"]) for m in client.transport.take()] == [
            ("joined", 1), ("message", 2), ("pong", 3), ("left", 4), ("echo", 5)]

    run(scenario)


def test_a_full_queue_pauses_reading_instead_of_closing() -> None:
    """Back-pressure: past MAX_QUEUED the transport stops reading; it reads again once
    the queue is half empty, and every message is answered, in order."""
    async def scenario() -> None:
        services, scheduler = make_services(message_burst="1000")
        await start(services)
        client = await welcomed(services, scheduler)
        client.session.on_text(json.dumps({"type": "join", "room": "r"}))
        for n in range(MAX_QUEUED):
            assert not client.transport.paused
            client.session.on_text(json.dumps({"type": "ping", "id": n}))
        assert client.transport.paused
        assert client.transport.closes == []
        await settle(services)
        assert not client.transport.paused
        replies = client.transport.take()
        assert [m["type"] for m in replies] == ["joined"] + ["pong"] * MAX_QUEUED
        assert [m["id"] for m in replies[1:]] == list(range(MAX_QUEUED))

    run(scenario)


def test_a_close_while_the_broker_answers_the_join_leaves_nothing_behind() -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler)
        client.session.on_text(json.dumps({"type": "join", "room": "r"}))
        client.gone(1006)
        await settle(services)
        assert services.hub.members("r") == []
        assert len(services.hub) == 0
        assert client.transport.messages() == []

    run(scenario)


# --- closing -----------------------------------------------------------------------


def test_on_closed_forgets_the_session_everywhere() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(TEAM_ROOMS)
        await start(services)
        client = await welcomed(services, scheduler)
        await client.send({"type": "join", "room": "team:x"})
        await client.send({"type": "join", "room": "lobby"})
        assert len(services.hub) == 2
        scheduler.advance(10)  # the user's bucket refilled: nothing to remember
        client.gone(1000)
        client.gone(1000)  # reported twice: counted once
        await settle(services)
        assert services.registry.total == 0 and services.registry.authenticated == 0
        assert "alice" not in services.message_buckets
        assert len(services.hub) == 0 and services.hub.rooms_of(client.session) == set()
        assert value(services.metrics.connections) == 0
        assert value(services.metrics.closes, code="1000") == 1
        assert await services.broker.user_connections(["alice"]) == {"alice": 0}
        assert (await services.broker.presence("team:x")).connections == 0
        assert await services.broker.rooms() == {}

    run(scenario)


def test_a_reconnect_does_not_reset_a_drained_bucket() -> None:
    async def scenario() -> None:
        services, scheduler = make_services(message_rate="1", message_burst="2")
        await start(services)
        client = await welcomed(services, scheduler)
        await client.send({"type": "ping"})
        await client.send({"type": "ping"})
        client.gone(1000)
        assert "alice" in services.message_buckets
        again = await welcomed(services, scheduler)
        assert (await again.ask({"type": "ping"}))["code"] == "rate_limited"

    run(scenario)


def test_shut_down_closes_1001_and_the_log_says_who_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler)
        scheduler.advance(2.5)
        client.session.shut_down()
        assert client.transport.close_code == 1001
        client.gone()
        lines = [r.getMessage() for r in caplog.records if r.name == "wsserver.connection"]
        assert any("close user=alice" in line and "code=1001" in line and "by=server" in line
                   and "duration=2.500s" in line for line in lines), lines

    caplog.set_level(logging.INFO, logger="wsserver")
    run(scenario)


def test_services_fixture_is_isolated() -> None:
    """Each make_services is its own world (metrics, registry, broker)."""
    one, _ = make_services()
    two, _ = make_services()
    assert one.metrics is not two.metrics and one.broker is not two.broker
    assert isinstance(one, Services)


def test_a_run_of_publishes_reaches_the_broker_at_once_and_what_follows_waits() -> None:
    from wsserver.brokers.memory import MemoryBroker

    class GatedBroker(MemoryBroker):
        """Publishes are handed over (recorded) at once and answered on release."""

        def __init__(self) -> None:
            super().__init__("node")
            self.handed: list[bytes] = []
            self.release = asyncio.Event()

        async def publish(self, room: str, message: bytes, **kw: Any) -> Any:
            self.handed.append(message)
            await self.release.wait()
            return await super().publish(room, message, **kw)

    async def scenario() -> None:
        broker = GatedBroker()
        services, scheduler = make_services(broker=lambda _: broker)
        await start(services)
        client = await welcomed(services, scheduler)
        client.session.on_text(json.dumps({"type": "join", "room": "r", "id": 0}))
        await settle(services)
        client.transport.take()
        for n in (1, 2, 3):
            client.session.on_text(json.dumps(
                {"type": "publish", "room": "r", "data": n, "id": n}))
        client.session.on_text(json.dumps({"type": "ping", "id": 4}))
        for _ in range(10):
            await asyncio.sleep(0)
        # All three with the broker, none answered: the ping waits behind them.
        assert [json.loads(m)["data"] for m in broker.handed] == [1, 2, 3]
        assert client.transport.take() == []
        broker.release.set()
        await settle(services)
        assert [(m["type"], m["id"]) for m in client.transport.take()] == [
            ("message", 1), ("message", 2), ("message", 3), ("pong", 4)]

    run(scenario())


def test_a_lagging_publisher_in_a_room_without_history_still_gets_its_reply() -> None:
    """Its own copy (with its id) answers its publish: nothing would read it back."""
    async def scenario() -> None:
        services, scheduler = make_services(max_write_buffer="10000")
        await start(services)
        publisher = await welcomed(services, scheduler)
        await publisher.send({"type": "join", "room": "r"})
        publisher.transport.backlog = 9_990
        replies = await publisher.send({"type": "publish", "room": "r", "data": "x", "id": 7})
        assert [(m["type"], m["id"]) for m in replies] == [("message", 7)]
        assert services.hub.delivery._origins == {}

    run(scenario)


def test_rpc_without_a_backend_is_an_unknown_type_that_says_why() -> None:
    async def scenario() -> None:
        services, scheduler = make_services()
        await start(services)
        client = await welcomed(services, scheduler)
        reply = await client.ask({"type": "rpc", "method": "whoami", "id": 3})
        assert reply == {"type": "error", "code": "unknown_type",
                         "message": "rpc is not enabled on this server (no --proxy-rpc-url)",
                         "id": 3}
        assert value(services.metrics.messages, type="rpc") == 1
        assert client.transport.closes == []

    run(scenario)


def test_a_client_gone_while_the_broker_counts_it_leaves_the_gauge_at_zero() -> None:
    """Session.open awaits the broker's user count; a client that closes meanwhile
    was never added to wsserver_connections and must not be taken off it."""
    from wsserver.brokers.memory import MemoryBroker

    class SlowCount(MemoryBroker):
        def __init__(self) -> None:
            super().__init__("node")
            self.release = asyncio.Event()

        async def user_connect(self, user: str, limit: int) -> int | None:
            await self.release.wait()
            return await super().user_connect(user, limit)

    async def scenario() -> None:
        broker = SlowCount()
        services, scheduler = make_services(broker=lambda _: broker)
        await start(services)
        client = Client(services, scheduler)
        opening = asyncio.ensure_future(client.open(mint(now=wall0())))
        await turns()
        client.gone()
        broker.release.set()
        assert await opening is False
        assert value(services.metrics.connections) == 0

    run(scenario)
