"""Fan-out is charged per room: a room's publish rate and its member cap."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.clients import welcomed
from tests.support.tokens import mint


async def reply_to(conn: Any, msg_id: Any) -> dict[str, Any]:
    """The next message carrying ``msg_id``, skipping other members' broadcasts."""
    while True:
        message = await conn.recv()
        assert message is not None, "closed"
        if message.get("id") == msg_id:
            return message


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "server_flags", [{"room_publish_rate": "1", "room_publish_burst": "3"}]
)
async def test_a_room_publish_rate_protects_its_readers(port: int) -> None:
    """Every user within their own rate, together over the room's: refused."""
    a = await welcomed(port, mint("a"))
    b = await welcomed(port, mint("b"))
    for conn in (a, b):
        assert (await conn.ask({"type": "join", "room": "busy"}))["type"] == "joined"
        assert (await conn.ask({"type": "join", "room": "quiet"}))["type"] == "joined"
    answers = []
    for n in range(4):
        conn = a if n % 2 else b
        await conn.send({"type": "publish", "room": "busy", "data": n,
                                             "id": n})
        answers.append(await reply_to(conn, n))
    # Three fit in the room's burst; the fourth is refused, the connection stays.
    assert [r["type"] for r in answers[:3]] == ["message"] * 3
    refused = answers[3]
    assert refused["type"] == "error" and refused["code"] == "rate_limited"
    assert refused["id"] == 3 and refused["retry_after"] > 0 and "busy" in refused["message"]
    # Another room is not affected, and the refused publish reached nobody.
    await a.send({"type": "publish", "room": "quiet", "data": "x",
                                      "id": "q"})
    reply = await reply_to(a, "q")
    assert reply["type"] == "message" and reply["room"] == "quiet"
    seen = []
    while True:
        message = await b.recv()
        assert message is not None
        seen.append((message["room"], message["data"]))
        if message["room"] == "quiet":
            break
    assert ("busy", 3) not in seen


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_room_members": "2"}])
async def test_a_full_room_refuses_one_more_member(port: int) -> None:
    conns = [await welcomed(port, mint(f"u{n}")) for n in range(3)]
    for conn in conns[:2]:
        assert (await conn.ask({"type": "join", "room": "small"}))["type"] == "joined"
    reply = await conns[2].ask({"type": "join", "room": "small", "id": 7})
    assert reply["code"] == "room_full" and reply["id"] == 7, json.dumps(reply)
    assert await conns[2].ask({"type": "ping"}) == {"type": "pong"}
