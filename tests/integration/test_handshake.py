"""Every row of the contract's handshake table, in order, over real sockets."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClosedError

from tests.integration.clients import ORIGIN, SECRET, connect, recv, token, welcomed
from wsserver.services import Services


async def refused(port: int, **kw: Any) -> HTTPClientError:
    with pytest.raises(HTTPClientError) as info:
        await connect(port, **kw)
    return info.value


@pytest.mark.gen_test
async def test_allowed_origin_and_no_origin_connect(port: int) -> None:
    conn = await welcomed(port, headers={"Origin": ORIGIN})
    conn.close()
    conn = await welcomed(port)  # non-browser clients send no Origin
    conn.close()


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://allowed.example.evil.com", "null", "http://allowed.example:81"]
)
async def test_origin_not_allowed_is_403_before_upgrade(
    port: int, origin: str
) -> None:
    error = await refused(port, tok=token(), headers={"Origin": origin})
    assert error.code == 403


@pytest.mark.gen_test
async def test_origin_is_checked_before_token(port: int) -> None:
    # Even a valid token does not help a foreign page; and a missing token
    # from a foreign page is reported as the origin problem.
    error = await refused(port, headers={"Origin": "http://evil.example"})
    assert error.code == 403
    assert error.response is not None
    assert json.loads(error.response.body)["error"] == "origin"


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"handshake_rate": "0.01", "handshake_burst": "2"}])
async def test_handshake_rate_is_429_with_retry_after(
    port: int, state: Services
) -> None:
    for _ in range(2):
        (await welcomed(port)).close()
    error = await refused(port, tok=token())
    assert error.code == 429
    assert error.response is not None
    assert int(error.response.headers["Retry-After"]) >= 1
    assert json.loads(error.response.body)["error"] == "handshake_rate"


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_connections": "2"}])
async def test_server_full_is_503_with_retry_after(port: int) -> None:
    first = await welcomed(port, token("a"))
    second = await welcomed(port, token("b"))
    error = await refused(port, tok=token("c"))
    assert error.code == 503
    assert error.response is not None and error.response.headers["Retry-After"]
    first.close()
    second.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_connections_per_ip": "1"}])
async def test_address_cap_is_429(port: int) -> None:
    first = await welcomed(port, token("a"))
    error = await refused(port, tok=token("b"))
    assert error.code == 429
    assert error.response is not None
    assert json.loads(error.response.body)["error"] == "address_cap"
    first.close()


@pytest.mark.gen_test
async def test_no_token_is_403(port: int) -> None:
    error = await refused(port)
    assert error.code == 403
    assert error.response is not None
    assert json.loads(error.response.body)["error"] == "no_token"


def _expired() -> str:
    return token(ttl=-60)


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (_expired, "token expired"),
        (lambda: token(key="another-secret-0123456789-abcdefghij"), "invalid token"),
        (lambda: "not.a.jwt", "invalid token"),
        (lambda: token(aud="someone-else"), "invalid token"),
        (lambda: token(sub=""), "invalid token"),
        (lambda: __import__("jwt").encode({"exp": 2**40}, SECRET, algorithm="HS256"), "invalid token"),
        (lambda: __import__("jwt").encode({"sub": "a", "exp": 2**40}, SECRET * 2, algorithm="HS512"),
         "invalid token"),
        (lambda: __import__("jwt").encode({"sub": "a", "exp": 2**40}, None, algorithm="none"),
         "invalid token"),
        (lambda: token(rooms="chat:*"), "invalid token: 'rooms' must be a list of strings"),
        (lambda: token(publish=["chat:*:x"]),
         "invalid token: 'publish' entry 0 has a '*' before its end (only a trailing '*' is allowed)"),
    ],
)
async def test_bad_token_upgrades_then_closes_4001(
    port: int, make_token: Any, reason: str, state: Services
) -> None:
    conn = await connect(port, make_token())
    assert await recv(conn) is None
    assert conn.close_code == 4001
    assert conn.close_reason == reason
    assert state.registry.authenticated == 0


@pytest.mark.gen_test
async def test_frames_pipelined_behind_a_bad_token_are_never_processed(
    port: int, state: Services
) -> None:
    conn = await connect(port, token(ttl=-60))
    # Sent without waiting for anything: they arrive right behind the upgrade.
    # The server cuts the connection once its close frame is out, so writes
    # on this side may fail, at once or later; that is the point.
    writes = []
    with contextlib.suppress(WebSocketClosedError):
        for n in range(20):
            writes.append(conn.write_message(json.dumps({"type": "join", "room": "r", "id": n})))
            writes.append(conn.write_message(json.dumps({"type": "echo", "data": n})))
    assert await recv(conn) is None
    assert conn.close_code == 4001
    for write in writes:
        with contextlib.suppress(WebSocketClosedError):
            await write
    assert len(state.hub) == 0
    messages = sum(s.value for m in state.metrics.messages.collect() for s in m.samples
                   if s.name.endswith("_total"))
    assert messages == 0


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_connections_per_user": "2"}])
async def test_user_cap_upgrades_then_closes_4008(port: int) -> None:
    a = await welcomed(port, token("alice"))
    b = await welcomed(port, token("alice"))
    c = await connect(port, token("alice"))
    assert await recv(c) is None
    assert c.close_code == 4008
    other = await welcomed(port, token("bob"))  # other users unaffected
    for conn in (a, b, other):
        conn.close()


@pytest.mark.gen_test
async def test_token_sources(port: int) -> None:
    via_sub = await connect(port, None, subprotocols=["bearer", token("sub-user")])
    welcome = await recv(via_sub)
    assert welcome is not None and welcome["user"] == "sub-user"
    # The server selects "bearer" and never echoes the token back.
    assert via_sub.selected_subprotocol == "bearer"
    via_sub.close()
    via_query = await connect(port, None, query=f"?token={token('query-user')}")
    welcome = await recv(via_query)
    assert welcome is not None and welcome["user"] == "query-user"
    via_query.close()
    # The header wins over the others.
    both = await connect(port, token("header-user"), subprotocols=["bearer", token("x")])
    welcome = await recv(both)
    assert welcome is not None and welcome["user"] == "header-user"
    assert both.selected_subprotocol is None
    both.close()


@pytest.mark.gen_test
async def test_welcome_carries_user_expiry_and_limits(port: int) -> None:
    tok = token("alice", ttl=300)
    conn = await connect(port, tok)
    welcome = await recv(conn)
    assert welcome is not None
    claims = __import__("jwt").decode(tok, SECRET, algorithms=["HS256"])
    assert welcome["type"] == "welcome"
    assert welcome["user"] == "alice"
    assert welcome["expires_at"] == claims["exp"]
    assert welcome["limits"]["message_rate"] == 10
    assert welcome["limits"]["max_message_size"] == 65536
    conn.close()


@pytest.mark.gen_test
async def test_plain_get_on_ws_is_400(http_server: Any, http_client: Any, base_url: str) -> None:
    response = await http_client.fetch(base_url + "/ws", raise_error=False)
    assert response.code == 400
