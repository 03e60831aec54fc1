"""History and recovery over real sockets: reconnect, ``join`` with ``since``, no loss,
no duplicate (docs/protocol.md, "History and recovery")."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.clients import welcomed
from tests.support.tokens import mint
from wsserver.services import Services

HISTORY_ROOMS: dict[str, Any] = {
    "join": "anyone", "publish": "members",
    "namespaces": {"chat": {"join": "anyone", "publish": "members", "history_size": 5}},
}
history_rooms = pytest.mark.parametrize("rooms_table", [HISTORY_ROOMS])


async def publish(conn: Any, room: str, data: Any) -> dict[str, Any]:
    """Publish and return the publisher's own copy (it carries the id)."""
    reply = await conn.ask({"type": "publish", "room": room, "data": data, "id": f"p{data}"})
    assert reply["type"] == "message" and reply["id"] == f"p{data}", reply
    return reply


@pytest.mark.gen_test
@history_rooms
async def test_a_reconnecting_client_gets_exactly_what_it_missed(port: int) -> None:
    alice = await welcomed(port, mint("alice"))
    bob = await welcomed(port, mint("bob"))
    joined = await alice.ask({"type": "join", "room": "chat:r"})
    epoch = joined["epoch"]
    assert joined == {"type": "joined", "room": "chat:r", "epoch": epoch, "offset": 0}
    await bob.ask({"type": "join", "room": "chat:r"})
    first = await publish(alice, "chat:r", 1)
    assert (first["offset"], first["epoch"]) == (1, epoch)
    seen = await bob.recv()
    assert seen is not None and seen["offset"] == 1
    await bob.close()
    for n in (2, 3, 4):
        await publish(alice, "chat:r", n)
    bob = await welcomed(port, mint("bob"))
    answer = await bob.ask({"type": "join", "room": "chat:r",
                             "since": {"offset": seen["offset"], "epoch": epoch}})
    assert {k: v for k, v in answer.items() if k != "messages"} == {
        "type": "joined", "room": "chat:r", "epoch": epoch, "offset": 4, "recovered": True}
    assert answer["messages"] == [
        {"type": "message", "room": "chat:r", "from": "alice", "data": n, "offset": n,
         "epoch": epoch} for n in (2, 3, 4)]
    # Then the live stream, from the next offset, no repeat.
    await publish(alice, "chat:r", 5)
    live = await bob.recv()
    assert live is not None and (live["offset"], live["data"]) == (5, 5)
    assert await bob.ask({"type": "ping"}) == {"type": "pong"}  # nothing else was queued


@pytest.mark.gen_test
@history_rooms
async def test_recovery_after_the_history_was_trimmed_is_refused(port: int) -> None:
    alice = await welcomed(port, mint("alice"))
    epoch = (await alice.ask({"type": "join", "room": "chat:t"}))["epoch"]
    for n in range(1, 9):  # 8 messages, 5 kept: 1 to 3 are gone
        await publish(alice, "chat:t", n)
    bob = await welcomed(port, mint("bob"))
    answer = await bob.ask({"type": "join", "room": "chat:t",
                             "since": {"offset": 1, "epoch": epoch}})
    assert answer == {"type": "joined", "room": "chat:t", "epoch": epoch, "offset": 8,
                      "recovered": False, "messages": []}
    carol = await welcomed(port, mint("carol"))
    answer = await carol.ask({"type": "join", "room": "chat:t",
                               "since": {"offset": 3, "epoch": epoch}})
    assert answer["recovered"] is True and [m["offset"] for m in answer["messages"]] == [
        4, 5, 6, 7, 8]
    dave = await welcomed(port, mint("dave"))
    answer = await dave.ask({"type": "join", "room": "chat:t",
                              "since": {"offset": 8, "epoch": "not-this-one"}})
    assert (answer["recovered"], answer["messages"]) == (False, [])


@pytest.mark.gen_test
@history_rooms
async def test_offsets_only_in_rooms_with_history(port: int, state: Services) -> None:
    alice = await welcomed(port, mint("alice"))
    bob = await welcomed(port, mint("bob"))
    assert await alice.ask({"type": "join", "room": "lobby"}) == {
        "type": "joined", "room": "lobby"}
    await bob.ask({"type": "join", "room": "lobby"})
    await bob.ask({"type": "join", "room": "chat:x"})
    epoch = (await alice.ask({"type": "join", "room": "chat:x"}))["epoch"]
    await publish(alice, "lobby", 1)
    await publish(alice, "chat:x", 2)
    plain, kept = await bob.recv(), await bob.recv()
    assert plain == {"type": "message", "room": "lobby", "from": "alice", "data": 1}
    assert kept == {"type": "message", "room": "chat:x", "from": "alice", "data": 2,
                    "offset": 1, "epoch": epoch}
    # The server API's publish answers the position too.
    result = await state.hub.publish("chat:x", "api")
    assert (result.offset, result.epoch) == (2, epoch)
    assert (await bob.recv()) == {"type": "message", "room": "chat:x", "from": None,
                                 "data": "api", "offset": 2, "epoch": epoch}
