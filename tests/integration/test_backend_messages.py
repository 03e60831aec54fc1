"""The subscribe, publish and rpc proxies and subscription tokens, over real sockets.

The in-process server asks :class:`tests.support.backend.AppBackend` (a real
aiohttp application on loopback) in namespaces whose policy says ``proxy``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.support.backend import AppBackend
from tests.support.clients import ROOM_TRAFFIC, connect, welcomed
from tests.support.metrics import value
from tests.support.tokens import mint
from wsserver.services import Services

ROOMS: dict[str, Any] = {
    "join": "token", "publish": "token",
    "namespaces": {
        "team": {"join": "proxy", "publish": "members"},
        "mod": {"join": "anyone", "publish": "proxy"},
        "chat": {"join": "anyone", "publish": "token"},
        "sys": {"join": "none", "publish": "none"},
    },
}


@pytest.fixture
def extra_flags() -> dict[str, str]:
    return {}


@pytest.fixture
def server_flags(app_backend: AppBackend, extra_flags: dict[str, str]) -> dict[str, str]:
    return {**app_backend.proxy_flags("subscribe", "publish", "rpc"), "proxy_timeout": "0.5",
            **extra_flags}


@pytest.fixture
def rooms_table() -> dict[str, Any]:
    return ROOMS


def sub_token(user: str, room: str, **claims: Any) -> str:
    return mint(user, room=room, **claims)


# --- subscribe -------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_backend_decides_joins_in_a_proxy_namespace(
    port: int, app_backend: AppBackend, state: Services
) -> None:
    app_backend.teams["team:red"] = {"alice"}
    alice = await welcomed(port, mint("alice"))
    bob = await welcomed(port, mint("bob"))
    assert await alice.ask({"type": "join", "room": "team:red", "data": {"why": "member"},
                            "id": 1}) == {"type": "joined", "room": "team:red", "id": 1}
    reply = await bob.ask({"type": "join", "room": "team:red", "id": 2})
    assert reply == {"type": "error", "code": "forbidden", "message": "bob is not in that team",
                     "id": 2}
    calls = app_backend.calls_of("subscribe")
    assert [c.body for c in calls] == [
        {"user": "alice", "room": "team:red", "data": {"why": "member"}},
        {"user": "bob", "room": "team:red"}]
    # Members publish (the namespace's publish rule), and bob stays connected.
    await bob.ask({"type": "ping"})
    message = await alice.ask({"type": "publish", "room": "team:red", "data": "hi"})
    assert message["from"] == "alice"
    assert value(state.metrics.proxy_requests, kind="subscribe", outcome="ok") == 1
    assert value(state.metrics.proxy_requests, kind="subscribe", outcome="refused") == 1


@pytest.mark.gen_test
@pytest.mark.parametrize("fault", ["500", "garbage", "hang"])
async def test_a_failing_subscribe_proxy_is_unavailable_quickly(
    port: int, app_backend: AppBackend, state: Services, fault: str
) -> None:
    app_backend.teams["team:red"] = {"alice"}
    app_backend.fault("subscribe", fault)
    alice = await welcomed(port, mint("alice"))
    started = time.monotonic()
    reply = await alice.ask({"type": "join", "room": "team:red", "id": 1})
    assert time.monotonic() - started < 2.0
    assert reply["type"] == "error" and reply["code"] == "unavailable" and reply["id"] == 1
    assert reply["retry_after"] > 0
    assert state.hub.members("team:red") == []
    # Other messages are served meanwhile and after.
    assert await alice.ask({"type": "echo", "data": 2}) == {"type": "echo", "data": 2}


# --- publish ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_backend_moderates_publishes(
    port: int, app_backend: AppBackend, state: Services
) -> None:
    alice = await welcomed(port, mint("alice"))
    bob = await welcomed(port, mint("bob"))
    await alice.join("mod:lobby")
    await bob.join("mod:lobby")
    mine = await alice.ask({"type": "publish", "room": "mod:lobby", "data": "darn it", "id": 1})
    assert mine == {"type": "message", "room": "mod:lobby", "from": "alice", "data": "d**n it",
                    "id": 1}
    assert (await bob.recv())["data"] == "d**n it"  # type: ignore[index]
    reply = await alice.ask({"type": "publish", "room": "mod:lobby", "data": "spam", "id": 2})
    assert reply == {"type": "error", "code": "forbidden", "message": "no spam here", "id": 2}
    untouched = await alice.ask({"type": "publish", "room": "mod:lobby", "data": {"x": 1}})
    assert untouched["data"] == {"x": 1}
    assert (await bob.recv())["data"] == {"x": 1}  # type: ignore[index]
    assert app_backend.calls_of("publish")[0].body == {
        "user": "alice", "room": "mod:lobby", "data": "darn it"}
    assert value(state.metrics.proxy_requests, kind="publish", outcome="ok") == 2


@pytest.mark.gen_test
async def test_proxied_publishes_keep_their_order(port: int, app_backend: AppBackend) -> None:
    alice = await welcomed(port, mint("alice"))
    bob = await welcomed(port, mint("bob"))
    await alice.join("mod:lobby")
    await bob.join("mod:lobby")
    for seq in range(10):
        await alice.send({"type": "publish", "room": "mod:lobby", "data": seq})
    got = [(await bob.recv())["data"] for _ in range(10)]  # type: ignore[index]
    assert got == list(range(10))


@pytest.mark.gen_test
async def test_a_dead_publish_proxy_is_unavailable(port: int, app_backend: AppBackend) -> None:
    alice = await welcomed(port, mint("alice"))
    await alice.join("mod:lobby")
    app_backend.fault("publish", "hang")
    reply = await alice.ask({"type": "publish", "room": "mod:lobby", "data": 1, "id": 7})
    assert reply["code"] == "unavailable" and reply["id"] == 7


# --- rpc ---------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_rpc_goes_to_the_backend_and_back(
    port: int, app_backend: AppBackend, state: Services
) -> None:
    alice = await welcomed(port, mint("alice"))
    assert await alice.ask({"type": "rpc", "method": "whoami", "id": "w"}) == {
        "type": "rpc_result", "data": {"user": "alice"}, "id": "w"}
    assert await alice.ask({"type": "rpc", "method": "add", "data": [1, 2, 3], "id": 2}) == {
        "type": "rpc_result", "data": 6, "id": 2}
    assert await alice.ask({"type": "rpc", "method": "fail", "id": 3}) == {
        "type": "error", "code": "not_found", "message": "no such order", "id": 3}
    reply = await alice.ask({"type": "rpc", "data": 1, "id": 4})
    assert reply["code"] == "bad_request" and reply["id"] == 4
    assert app_backend.calls_of("rpc")[1].body == {"user": "alice", "method": "add",
                                                    "data": [1, 2, 3]}
    assert value(state.metrics.messages, type="rpc") == 3
    assert value(state.metrics.proxy_requests, kind="rpc", outcome="ok") == 2


@pytest.mark.gen_test
@pytest.mark.parametrize("extra_flags", [{"message_rate": "0.01", "message_burst": "2"}])
async def test_rpc_is_charged_to_the_users_bucket(port: int, app_backend: AppBackend) -> None:
    alice = await welcomed(port, mint("alice"))
    for _ in range(2):
        assert (await alice.ask({"type": "rpc", "method": "whoami"}))["type"] == "rpc_result"
    reply = await alice.ask({"type": "rpc", "method": "whoami"})
    assert reply["code"] == "rate_limited"
    assert len(app_backend.calls_of("rpc")) == 2


@pytest.mark.gen_test
@pytest.mark.parametrize("fault", ["500", "not_json", "hang"])
async def test_a_failing_rpc_backend_is_unavailable(
    port: int, app_backend: AppBackend, fault: str, state: Services
) -> None:
    app_backend.fault("rpc", fault)
    alice = await welcomed(port, mint("alice"))
    reply = await alice.ask({"type": "rpc", "method": "whoami", "id": 1})
    assert reply["code"] == "unavailable" and reply["id"] == 1
    outcome = {"500": "error", "not_json": "invalid", "hang": "timeout"}[fault]
    assert value(state.metrics.proxy_requests, kind="rpc", outcome=outcome) == 1


# --- subscription tokens -------------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_subscription_token_joins_whatever_the_join_rule(
    port: int, state: Services
) -> None:
    alice = await welcomed(port, mint("alice"))  # no grants at all
    reply = await alice.ask({"type": "join", "room": "secret"})
    assert reply["code"] == "forbidden"
    assert await alice.ask({"type": "join", "room": "secret",
                            "token": sub_token("alice", "secret"), "id": 1}) == {
        "type": "joined", "room": "secret", "id": 1}
    # A proxy namespace too: the application already decided when it signed.
    await alice.ask({"type": "join", "room": "team:x", "token": sub_token("alice", "team:x")})
    assert state.hub.rooms_of(alice_session(state, "alice")) == {"secret", "team:x"}
    # Joining does not grant publishing without "publish": true.
    reply = await alice.ask({"type": "publish", "room": "secret", "data": 1})
    assert reply["code"] == "forbidden"


def alice_session(state: Services, user: str) -> Any:
    (session,) = state.registry.connections_of(user)
    return session


@pytest.mark.gen_test
async def test_publish_true_grants_publishing(port: int) -> None:
    alice = await welcomed(port, mint("alice"))
    await alice.ask({"type": "join", "room": "chat:1",
                     "token": sub_token("alice", "chat:1", publish=True)})
    reply = await alice.ask({"type": "publish", "room": "chat:1", "data": "hi"})
    assert reply["type"] == "message" and reply["data"] == "hi"


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: sub_token("bob", "secret"),
         "subscription token refused: subscription token issued for another user"),
        (lambda: sub_token("alice", "other"),
         "subscription token refused: subscription token issued for another room"),
        (lambda: mint("alice"), "subscription token refused: not a subscription token: "
                                "it has no 'room' claim"),
        (lambda: sub_token("alice", "secret", ttl=-60),
         "subscription token refused: token expired"),
        (lambda: sub_token("alice", "secret", key="another-secret-0123456789-abcdefghij"),
         "subscription token refused: invalid token"),
        (lambda: "garbage", "subscription token refused: invalid token"),
    ],
    ids=["other-user", "other-room", "no-room-claim", "expired", "wrong-key", "garbage"],
)
async def test_a_bad_subscription_token_is_forbidden_and_the_connection_stays(
    port: int, make: Any, message: str, state: Services
) -> None:
    alice = await welcomed(port, mint("alice"))
    reply = await alice.ask({"type": "join", "room": "secret", "token": make(), "id": 5})
    assert reply == {"type": "error", "code": "forbidden", "message": message, "id": 5}
    assert await alice.ask({"type": "ping"}) == {"type": "pong"}
    assert value(state.metrics.rejections, reason="forbidden") == 1


@pytest.mark.gen_test
async def test_nobody_joins_a_none_namespace_even_with_a_token(port: int) -> None:
    alice = await welcomed(port, mint("alice"))
    reply = await alice.ask({"type": "join", "room": "sys:x", "token": sub_token("alice", "sys:x")})
    assert reply["code"] == "forbidden"


@pytest.mark.gen_test
async def test_a_subscription_token_cannot_open_a_connection(port: int) -> None:
    conn = await connect(port, sub_token("alice", "secret"))
    assert await conn.recv() is None
    assert conn.close_code == 4001
    assert conn.close_reason == "invalid token: a subscription token cannot open a connection"


@pytest.mark.gen_test
async def test_rooms_joined_by_token_stay_after_a_refresh(port: int, state: Services) -> None:
    alice = await welcomed(port, mint("alice", rooms=["chat:*", "a"]))
    await alice.join("a")
    await alice.ask({"type": "join", "room": "secret", "token": sub_token("alice", "secret")})
    reply = await alice.ask({"type": "refresh", "token": mint("alice")}, skip=ROOM_TRAFFIC)
    assert reply["type"] == "refreshed"
    left = await alice.recv()
    assert left == {"type": "left", "room": "a", "reason": "forbidden"}
    assert await alice.ask({"type": "ping"}) == {"type": "pong"}
    assert state.hub.rooms_of(alice_session(state, "alice")) == {"secret"}


@pytest.mark.gen_test
async def test_leaving_forgets_the_token_grant(port: int) -> None:
    alice = await welcomed(port, mint("alice"))
    await alice.ask({"type": "join", "room": "secret", "token": sub_token("alice", "secret")})
    assert (await alice.ask({"type": "leave", "room": "secret"}))["type"] == "left"
    reply = await alice.ask({"type": "join", "room": "secret"})
    assert reply["code"] == "forbidden"

