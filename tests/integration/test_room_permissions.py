"""Room permissions, presence and join/leave events over real sockets.

Every "receives nothing" below is proven the same way: after the traffic the
client must not see, it sends a ``ping`` and the very next thing it reads is
its ``pong``. The memory broker hands a publication to every member before
the publisher gets its own copy, so a frame that leaked would arrive first.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.clients import AsyncClient, aclose_all, connect, welcomed
from tests.support.metrics import labelled
from tests.support.servers import RunningServer
from tests.support.tokens import mint
from wsserver.services import Services

#: The contract's defaults: join and publish only what the token grants.
DEFAULT_POLICY: dict[str, Any] = {}

#: One namespace per rule, the rest closed.
RULES: dict[str, Any] = {
    "namespaces": {
        "open": {"join": "anyone", "publish": "members"},
        "ro": {"join": "anyone", "publish": "none"},
        "tok": {"join": "anyone", "publish": "token"},
        "closed": {"join": "none", "publish": "members"},
        "user": {"join": "owner", "publish": "none"},
    }
}

EVENTS: dict[str, Any] = {
    "namespaces": {
        "chat": {"join": "anyone", "publish": "members", "presence": True, "join_leave": True},
        "quiet": {"join": "anyone", "publish": "members"},
        "vip": {"join": "token", "publish": "members", "presence": True, "join_leave": True},
    }
}


async def receives_nothing(conn: AsyncClient) -> None:
    """The next message ``conn`` reads is the answer to its own ping."""
    assert await conn.ask({"type": "ping", "id": "quiet?"}) == {"type": "pong", "id": "quiet?"}


async def forbidden(conn: AsyncClient, message: dict[str, Any]) -> None:
    """``message`` is answered ``forbidden`` with its id, and the connection stays open."""
    reply = await conn.ask({**message, "id": "f1"})
    assert reply["type"] == "error" and reply["code"] == "forbidden", reply
    assert reply["id"] == "f1" and reply["message"]
    await receives_nothing(conn)


async def joins(conn: AsyncClient, room: str) -> None:
    assert await conn.ask({"type": "join", "room": room}) == {"type": "joined", "room": room}


async def says(conn: AsyncClient, room: str, data: Any, user: str) -> None:
    """``conn`` publishes ``data`` to ``room`` and gets its own copy."""
    reply = await conn.ask({"type": "publish", "room": room, "data": data})
    assert reply == {"type": "message", "room": room, "from": user, "data": data}


# --- deny by default -----------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [DEFAULT_POLICY])
async def test_without_grants_join_and_publish_are_forbidden(port: int, state: Services) -> None:
    nobody = await welcomed(port, mint("nobody"))
    await forbidden(nobody, {"type": "join", "room": "lobby"})
    await forbidden(nobody, {"type": "join", "room": "chat:1"})
    # Joined through a `rooms` grant, but nothing grants publishing.
    reader = await welcomed(port, mint("reader", rooms=["lobby"]))
    await joins(reader, "lobby")
    await forbidden(reader, {"type": "publish", "room": "lobby", "data": "hi"})
    assert state.hub.members("chat:1") == []
    assert "forbidden" in _rejections(state)


def _rejections(state: Services) -> dict[str | tuple[str, ...], float]:
    return labelled(state.metrics.rejections)


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [DEFAULT_POLICY])
@pytest.mark.parametrize(
    ("grant", "room"),
    [(["lobby"], "lobby"), (["chat:*"], "chat:42"), (["chat:4*"], "chat:42"), (["*"], "x:y")],
)
async def test_a_grant_lets_a_user_join_and_publish(port: int, grant: list[str], room: str) -> None:
    conn = await welcomed(port, mint("alice", rooms=grant, publish=grant))
    await joins(conn, room)
    await says(conn, room, {"n": 1}, "alice")


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [DEFAULT_POLICY])
async def test_an_eavesdropper_can_neither_read_nor_write_a_private_room(
    port: int, state: Services
) -> None:
    room = "dm:alice:bob"
    grant = {"rooms": [room], "publish": [room]}
    alice = await welcomed(port, mint("alice", **grant))
    bob = await welcomed(port, mint("bob", **grant))
    # Eve has grants, just not this one: a look-alike prefix and her own rooms.
    eve = await welcomed(port, mint("eve", rooms=["dm:eve:*", "dm:alice"],
                                     publish=["dm:eve:*", "*"]))
    await joins(alice, room)
    await joins(bob, room)
    await forbidden(eve, {"type": "join", "room": room})
    # Not a member, so her publish grant "*" does not reach the room either.
    reply = await eve.ask({"type": "publish", "room": room, "data": "spoof", "id": 2})
    assert reply["type"] == "error" and reply["code"] == "bad_request" and reply["id"] == 2
    await says(alice, room, "secret", "alice")
    assert await bob.recv() == {"type": "message", "room": room, "from": "alice", "data": "secret"}
    await says(bob, room, "reply", "bob")
    assert await alice.recv() == {"type": "message", "room": room, "from": "bob", "data": "reply"}
    await receives_nothing(eve)
    await receives_nothing(bob)  # eve's spoof never reached the room
    assert {s.user for s in state.hub.members(room)} == {"alice", "bob"}


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [DEFAULT_POLICY])
@pytest.mark.parametrize(
    ("grant", "room"),
    [
        (["chat:*"], "chatter"),
        (["chat:*"], "chat"),
        (["chat"], "chat:1"),
        (["chat"], "chatx"),
        (["dm:alice"], "dm:alice:bob"),
        (["dm:alice:bob"], "dm:alice:bo"),
        (["Lobby"], "lobby"),
    ],
)
async def test_look_alikes_are_not_granted(port: int, grant: list[str], room: str) -> None:
    conn = await welcomed(port, mint("alice", rooms=grant, publish=grant))
    await forbidden(conn, {"type": "join", "room": room})


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [RULES])
async def test_namespace_rules(port: int) -> None:
    everything = {"rooms": ["*"], "publish": ["*"]}
    alice = await welcomed(port, mint("alice"))
    bob = await welcomed(port, mint("bob", **everything))
    # anyone / members
    await joins(alice, "open:1")
    await says(alice, "open:1", 1, "alice")
    # publish = none: nobody, whatever the token says
    await joins(alice, "ro:1")
    await joins(bob, "ro:1")
    await forbidden(alice, {"type": "publish", "room": "ro:1", "data": 1})
    await forbidden(bob, {"type": "publish", "room": "ro:1", "data": 1})
    # publish = token
    await joins(alice, "tok:1")
    await joins(bob, "tok:1")
    await forbidden(alice, {"type": "publish", "room": "tok:1", "data": 1})
    await says(bob, "tok:1", 2, "bob")
    assert await alice.recv() == {"type": "message", "room": "tok:1", "from": "bob", "data": 2}
    # join = none: the server API only
    await forbidden(bob, {"type": "join", "room": "closed:1"})
    # the default namespace stays "token": alice has nothing, bob has "*"
    await forbidden(alice, {"type": "join", "room": "lobby"})
    await joins(bob, "lobby")
    # an undeclared namespace follows the default
    await forbidden(alice, {"type": "join", "room": "other:1"})


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [RULES])
async def test_owner_rooms_admit_only_their_user(port: int) -> None:
    alice = await welcomed(port, mint("alice"))
    bob = await welcomed(port, mint("bob", rooms=["*"], publish=["*"]))
    alicia = await welcomed(port, mint("alice:x"))
    await joins(alice, "user:alice")
    await forbidden(alice, {"type": "publish", "room": "user:alice", "data": "me"})
    await forbidden(alice, {"type": "join", "room": "user:bob"})
    await forbidden(alice, {"type": "join", "room": "user:alice:x"})
    await forbidden(alice, {"type": "join", "room": "user:"})
    await forbidden(bob, {"type": "join", "room": "user:alice"})  # grants do not open it
    await forbidden(alicia, {"type": "join", "room": "user:alice"})
    await joins(alicia, "user:alice:x")
    await receives_nothing(alice)


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [DEFAULT_POLICY])
@pytest.mark.parametrize(
    "claims",
    [
        {"rooms": "chat:*"},
        {"rooms": [1]},
        {"rooms": None},
        {"publish": {"chat:*": True}},
        {"rooms": ["a*b"]},
        {"rooms": [""]},
        {"rooms": ["BAD:x"]},
    ],
)
async def test_a_malformed_claim_closes_4001(port: int, claims: dict[str, Any]) -> None:
    conn = await connect(port, mint("alice", **claims))
    assert await conn.recv() is None
    assert conn.close_code == 4001
    assert conn.close_reason is not None and conn.close_reason.startswith("invalid token")


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [DEFAULT_POLICY])
async def test_refresh_with_fewer_grants_leaves_those_rooms(port: int, state: Services) -> None:
    alice = await welcomed(port, mint("alice", rooms=["a", "b", "c:*"]))
    bob = await welcomed(port, mint("bob", rooms=["*"], publish=["*"]))
    for room in ("a", "b", "c:1"):
        await joins(alice, room)
        await joins(bob, room)
    reply = await alice.ask({"type": "refresh", "token": mint("alice", rooms=["a"]), "id": 5})
    assert reply["type"] == "refreshed" and reply["id"] == 5
    lefts = [await alice.recv(), await alice.recv()]
    assert lefts == [{"type": "left", "room": "b", "reason": "forbidden"},
                     {"type": "left", "room": "c:1", "reason": "forbidden"}]
    await says(bob, "b", "gone?", "bob")
    await says(bob, "c:1", "gone?", "bob")
    await says(bob, "a", "still here", "bob")
    assert await alice.recv() == {"type": "message", "room": "a", "from": "bob",
                                 "data": "still here"}
    await receives_nothing(alice)
    assert state.hub.rooms_of(next(s for s in state.sessions() if s.user == "alice")) == {"a"}
    await forbidden(alice, {"type": "join", "room": "b"})


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [DEFAULT_POLICY])
async def test_refresh_without_the_publish_grant_stops_publishing(port: int) -> None:
    alice = await welcomed(port, mint("alice", rooms=["a"], publish=["a"]))
    await joins(alice, "a")
    await says(alice, "a", 1, "alice")
    reply = await alice.ask({"type": "refresh", "token": mint("alice", rooms=["a"])})
    assert reply["type"] == "refreshed"
    await forbidden(alice, {"type": "publish", "room": "a", "data": 2})  # still a member
    await receives_nothing(alice)


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [DEFAULT_POLICY])
async def test_refresh_with_a_malformed_claim_closes_4001(port: int) -> None:
    alice = await welcomed(port, mint("alice", rooms=["a"]))
    await alice.send(
        {"type": "refresh", "token": mint("alice", rooms="a")})
    assert await alice.recv() is None
    assert alice.close_code == 4001


def test_demo_mode_opens_the_default_namespace_and_says_so(
    run_server: Any, io_loop: Any
) -> None:
    server: RunningServer = run_server()
    assert "DEMO MODE" in server.logs()
    server.wait_for_log(r"rooms \(demo mode\): default namespace join=anyone publish=members")

    async def chat() -> None:
        try:
            alice, bob = [await welcomed(server, server.demo_token(user), library="tornado")
                          for user in ("alice", "bob")]
            await joins(alice, "lobby")
            await joins(bob, "lobby")
            await says(alice, "lobby", "hello", "alice")
            assert await bob.recv() == {"type": "message", "room": "lobby", "from": "alice",
                                       "data": "hello"}
        finally:
            await aclose_all()

    io_loop.run_sync(chat)


def test_demo_mode_keeps_each_users_room_to_that_user(run_server: Any, io_loop: Any) -> None:
    """As the demo page's hint says: only alice joins user:alice, and no client
    publishes there (only the server API would)."""
    server: RunningServer = run_server()
    server.wait_for_log(r"rooms \(demo mode\): .*; user: join=owner publish=none")

    async def rooms() -> None:
        try:
            alice, bob = [await welcomed(server, server.demo_token(user), library="tornado")
                          for user in ("alice", "bob")]
            await joins(alice, "user:alice")
            await forbidden(bob, {"type": "join", "room": "user:alice"})
            await forbidden(alice, {"type": "publish", "room": "user:alice", "data": "me"})
            # Not a member: refused before the policy is asked, and nothing arrives.
            reply = await bob.ask({"type": "publish", "room": "user:alice", "data": "hi"})
            assert reply["type"] == "error", reply
            await receives_nothing(alice)
        finally:
            await aclose_all()

    io_loop.run_sync(rooms)


# --- presence and join/leave events ----------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [EVENTS])
async def test_presence_counts_users_and_connections(port: int) -> None:
    alice1 = await welcomed(port, mint("alice"))
    alice2 = await welcomed(port, mint("alice"))
    bob = await welcomed(port, mint("bob"))
    for conn in (alice1, alice2, bob):
        await conn.ask({"type": "join", "room": "quiet:1"})
        await joins(conn, "chat:1")
        await _drain_events(conn)
    reply = await bob.ask({"type": "presence", "room": "chat:1", "id": 3})
    assert reply == {"type": "presence", "room": "chat:1", "users": ["alice", "bob"],
                     "connections": 3, "id": 3}
    reply = await bob.ask({"type": "presence", "room": "quiet:1", "id": 4})
    assert reply["type"] == "error" and reply["code"] == "bad_request" and reply["id"] == 4
    await receives_nothing(bob)


async def _drain_events(conn: AsyncClient) -> None:
    """Read until the answer to a ping, dropping the join/leave events before it."""
    await conn.send({"type": "ping", "id": "drain"})
    while (message := await conn.recv()) != {"type": "pong", "id": "drain"}:
        assert message is not None and message["type"] in ("user_joined", "user_left"), message


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [EVENTS])
async def test_user_joined_once_and_user_left_after_the_last_connection(port: int) -> None:
    room = "chat:1"
    bob = await welcomed(port, mint("bob"))
    await joins(bob, room)
    assert await bob.recv() == {"type": "user_joined", "room": room, "user": "bob"}
    alice1 = await welcomed(port, mint("alice"))
    alice2 = await welcomed(port, mint("alice"))
    await joins(alice1, room)
    assert await bob.recv() == {"type": "user_joined", "room": room, "user": "alice"}
    assert await alice1.recv() == {"type": "user_joined", "room": room, "user": "alice"}
    await joins(alice2, room)
    # No second user_joined: the next thing bob sees is alice's message.
    await says(alice1, room, "one", "alice")
    assert await bob.recv() == {"type": "message", "room": room, "from": "alice", "data": "one"}
    assert await alice2.recv() == {"type": "message", "room": room, "from": "alice", "data": "one"}
    assert await alice1.ask({"type": "leave", "room": room}) == {"type": "left", "room": room}
    await says(alice2, room, "two", "alice")  # alice is still in the room: no user_left
    assert await bob.recv() == {"type": "message", "room": room, "from": "alice", "data": "two"}
    await alice2.close()  # her last connection goes
    assert await bob.recv() == {"type": "user_left", "room": room, "user": "alice"}
    await receives_nothing(bob)
    await receives_nothing(alice1)  # left before: sees neither the message nor the event


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [EVENTS])
async def test_no_join_leave_events_where_they_are_off(port: int) -> None:
    room = "quiet:1"
    bob = await welcomed(port, mint("bob"))
    alice = await welcomed(port, mint("alice"))
    await joins(bob, room)
    await joins(alice, room)
    assert await alice.ask({"type": "leave", "room": room}) == {"type": "left", "room": room}
    await joins(alice, room)
    await alice.close()
    carol = await welcomed(port, mint("carol"))
    await joins(carol, room)
    await says(carol, room, "marker", "carol")
    assert await bob.recv() == {"type": "message", "room": room, "from": "carol", "data": "marker"}
    await receives_nothing(bob)


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [EVENTS])
async def test_presence_and_events_need_the_join_grant(port: int) -> None:
    room = "vip:1"
    alice = await welcomed(port, mint("alice", rooms=["vip:*"]))
    await joins(alice, room)
    assert await alice.recv() == {"type": "user_joined", "room": room, "user": "alice"}
    eve = await welcomed(port, mint("eve", rooms=["vip"]))
    await forbidden(eve, {"type": "presence", "room": room})
    await forbidden(eve, {"type": "join", "room": room})
    # A granted user asks without joining: allowed, and counted as nobody new.
    bob = await welcomed(port, mint("bob", rooms=["vip:1"]))
    reply = await bob.ask({"type": "presence", "room": room})
    assert reply == {"type": "presence", "room": room, "users": ["alice"], "connections": 1}
    await receives_nothing(alice)
