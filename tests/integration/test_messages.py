"""Every client message type, and every kind of bad input, over real sockets."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from tests.support.clients import welcomed
from tests.support.metrics import labelled
from tests.support.tokens import mint
from wsserver.services import Services


@pytest.mark.gen_test
async def test_ping_and_echo_carry_the_id(port: int) -> None:
    conn = await welcomed(port)
    assert await conn.ask({"type": "ping"}) == {"type": "pong"}
    assert await conn.ask({"type": "ping", "id": 7}) == {"type": "pong", "id": 7}
    data = {"nested": [1, 2.5, None, True, "é", {"deep": []}]}
    reply = await conn.ask({"type": "echo", "data": data, "id": "e1"})
    assert reply == {"type": "echo", "data": data, "id": "e1"}


@pytest.mark.gen_test
async def test_rooms_join_publish_leave(port: int, state: Services) -> None:
    alice = await welcomed(port, mint("alice"))
    bob = await welcomed(port, mint("bob"))
    carol = await welcomed(port, mint("carol"))  # never joins
    assert await alice.ask({"type": "join", "room": "lobby", "id": 1}) == {
        "type": "joined", "room": "lobby", "id": 1}
    assert await bob.ask({"type": "join", "room": "lobby"}) == {"type": "joined", "room": "lobby"}
    reply = await alice.ask({"type": "publish", "room": "lobby", "data": {"text": "hi"}, "id": 2})
    expected = {"type": "message", "room": "lobby", "from": "alice", "data": {"text": "hi"}}
    assert reply == {**expected, "id": 2}  # the sender is a member too
    assert await bob.recv() == expected
    assert await bob.ask({"type": "leave", "room": "lobby"}) == {"type": "left", "room": "lobby"}
    await alice.ask({"type": "publish", "room": "lobby", "data": "only me"})
    # bob left and carol never joined: the next thing each sees is its own reply.
    assert await bob.ask({"type": "ping"}) == {"type": "pong"}
    assert await carol.ask({"type": "ping"}) == {"type": "pong"}
    assert state.hub.members("lobby") != []


@pytest.mark.gen_test
async def test_publish_without_joining_is_refused(port: int) -> None:
    conn = await welcomed(port)
    reply = await conn.ask({"type": "publish", "room": "elsewhere", "data": 1, "id": 9})
    assert reply["type"] == "error" and reply["code"] == "bad_request" and reply["id"] == 9


@pytest.mark.gen_test
async def test_disconnect_leaves_rooms(port: int, state: Services) -> None:
    conn = await welcomed(port)
    await conn.ask({"type": "join", "room": "r"})
    assert len(state.hub) == 1
    await conn.close()
    other = await welcomed(port, mint("bob"))  # an event after the close was handled
    await other.ask({"type": "ping"})
    while state.registry.total > 1:
        await other.ask({"type": "ping"})
    assert len(state.hub) == 0


BAD_INPUTS: list[tuple[str, str]] = [
    ("not json", "bad_request"),
    ("[1, 2]", "bad_request"),
    ('"text"', "bad_request"),
    ("{}", "bad_request"),
    ('{"type": 1}', "bad_request"),
    ('{"type": "echo"}', "bad_request"),
    ('{"type": "echo", "data": NaN}', "bad_request"),
    ('{"type": "echo", "data": ' + "1" * 10_000 + "}", "bad_request"),
    ('{"type": "echo", "data": ' + "[" * 5000 + "]" * 5000 + "}", "bad_request"),
    ('{"type": "join", "room": 3}', "bad_request"),
    ('{"type": "task", "name": "primes", "args": "x"}', "bad_request"),
    ('{"type": "refresh"}', "bad_request"),
    ('{"type": "fly"}', "unknown_type"),
]


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"message_burst": "100"}])
async def test_bad_input_gets_an_error_and_the_connection_stays_open(port: int) -> None:
    conn = await welcomed(port)
    for text, code in BAD_INPUTS:
        await conn.send(text)
        reply = await conn.recv()
        assert reply is not None, (text[:40], conn.close_code)
        assert reply["type"] == "error" and reply["code"] == code, (text[:40], reply)
        assert isinstance(reply["message"], str) and "Traceback" not in reply["message"]
    assert await conn.ask({"type": "ping"}) == {"type": "pong"}


@pytest.mark.gen_test
async def test_error_replies_carry_a_readable_id(port: int) -> None:
    conn = await welcomed(port)
    reply = await conn.ask({"type": "fly", "id": "q"})
    assert reply == {"type": "error", "code": "unknown_type",
                     "message": "unknown message type 'fly'", "id": "q"}
    reply = await conn.ask({"type": "join", "room": 5, "id": 12})
    assert reply["code"] == "bad_request" and reply["id"] == 12


@pytest.mark.gen_test
async def test_binary_frame_closes_1008(port: int) -> None:
    conn = await welcomed(port)
    await conn.send(b"\x00\x01")
    assert await conn.recv() is None
    assert conn.close_code == 1008


@pytest.mark.gen_test
async def test_client_close_1000_is_logged_and_forgotten(
    port: int, state: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsserver")
    conn = await welcomed(port, mint("leaver"))
    await conn.close(1000, "bye")
    other = await welcomed(port, mint("stayer"))
    while state.registry.total > 1:
        await other.ask({"type": "ping"})
    assert state.registry.count_for_user("leaver") == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "wsserver.connection"]
    assert any("close user=leaver" in line and "code=1000" in line and "by=client" in line
               and "duration=" in line for line in lines), lines


@pytest.mark.gen_test
async def test_a_handler_bug_answers_internal_error_and_keeps_serving(
    port: int, state: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsserver.session import Session

    def broken(self: Any, msg: Any) -> None:
        raise RuntimeError("boom with secret detail")

    monkeypatch.setitem(Session._SYNC, "echo", broken)
    conn = await welcomed(port)
    reply = await conn.ask({"type": "echo", "data": 1, "id": 1})
    assert reply["code"] == "internal_error" and reply["id"] == 1
    assert "boom" not in json.dumps(reply)
    assert await conn.ask({"type": "ping"}) == {"type": "pong"}


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_message_size": "1024"}])
async def test_too_big_closes_1009_and_is_counted_as_such(port: int, state: Services) -> None:
    conn = await welcomed(port)
    await conn.send({"type": "echo", "data": "x" * 2048})
    assert await conn.recv() is None
    assert conn.close_code == 1009
    other = await welcomed(port, mint("bob"))
    while state.registry.total > 1:
        await other.ask({"type": "ping"})
    assert labelled(state.metrics.closes) == {"1009": 1.0}


@pytest.mark.gen_test
async def test_bad_task_arguments_are_answered_and_counted(port: int, state: Services) -> None:
    conn = await welcomed(port)
    reply = await conn.ask({"type": "task", "name": "primes", "args": {"limit": True}, "id": 5})
    assert reply["code"] == "bad_request" and reply["id"] == 5
    assert labelled(state.metrics.tasks) == {("primes", "bad_request"): 1.0}
