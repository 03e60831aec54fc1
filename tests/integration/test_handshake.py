"""Every row of the contract's handshake table, in order, over real sockets.

Every test runs twice: with the upgrade answered at accept time (the native
path, as the server runs) and through Tornado's HTTP server (as TLS
connections and odd heads are): both must answer alike.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import jwt
import pytest
from tornado.websocket import WebSocketClosedError

from tests.support.clients import ORIGIN, connect, refused, welcomed
from tests.support.metrics import labelled
from tests.support.tokens import SECRET, mint
from wsserver.services import Services

#: Both ways a plain-TCP upgrade is answered (see tests/integration/conftest.py).
pytestmark = pytest.mark.parametrize("handshake_path", ["native", "tornado"])


@pytest.mark.gen_test
async def test_allowed_origin_and_no_origin_connect(port: int) -> None:
    conn = await welcomed(port, headers={"Origin": ORIGIN})
    await conn.close()
    conn = await welcomed(port)  # non-browser clients send no Origin
    await conn.close()


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://allowed.example.evil.com", "null", "http://allowed.example:81"]
)
async def test_origin_not_allowed_is_403_before_upgrade(
    port: int, origin: str
) -> None:
    error = await refused(port, mint(), headers={"Origin": origin})
    assert error.status == 403


@pytest.mark.gen_test
async def test_origin_is_checked_before_token(port: int) -> None:
    # Even a valid token does not help a foreign page; and a missing token
    # from a foreign page is reported as the origin problem.
    error = await refused(port, headers={"Origin": "http://evil.example"})
    assert error.status == 403
    assert error.json()["error"] == "origin"


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"handshake_rate": "0.01", "handshake_burst": "2"}])
async def test_handshake_rate_is_429_with_retry_after(
    port: int, state: Services
) -> None:
    for _ in range(2):
        await (await welcomed(port)).close()
    error = await refused(port, mint())
    assert error.status == 429
    assert int(error.headers["Retry-After"]) >= 1
    assert error.json()["error"] == "handshake_rate"


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_connections": "2"}])
async def test_server_full_is_503_with_retry_after(port: int) -> None:
    first = await welcomed(port, mint("a"))
    second = await welcomed(port, mint("b"))
    error = await refused(port, mint("c"))
    assert error.status == 503
    assert error.headers["Retry-After"]
    await first.close()
    await second.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_connections_per_ip": "1"}])
async def test_address_cap_is_429(port: int) -> None:
    first = await welcomed(port, mint("a"))
    error = await refused(port, mint("b"))
    assert error.status == 429
    assert error.json()["error"] == "address_cap"
    await first.close()


@pytest.mark.gen_test
async def test_no_token_is_403(port: int) -> None:
    error = await refused(port)
    assert error.status == 403
    assert error.json()["error"] == "no_token"


def _expired() -> str:
    return mint(ttl=-60)


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (_expired, "token expired"),
        (lambda: mint(key="another-secret-0123456789-abcdefghij"), "invalid token"),
        (lambda: "not.a.jwt", "invalid token"),
        (lambda: mint(aud="someone-else"), "invalid token"),
        (lambda: mint(sub=""), "invalid token"),
        (lambda: mint(None, exp=2**40), "invalid token"),
        (lambda: mint("a", exp=2**40, key=SECRET * 2, algorithm="HS512"), "invalid token"),
        (lambda: mint("a", exp=2**40, key=None, algorithm="none"), "invalid token"),
        (lambda: mint(rooms="chat:*"), "invalid token: 'rooms' must be a list of strings"),
        (lambda: mint(publish=["chat:*:x"]),
         "invalid token: 'publish' entry 0 has a '*' before its end (only a trailing '*' is allowed)"),
    ],
)
async def test_bad_token_upgrades_then_closes_4001(
    port: int, make_token: Any, reason: str, state: Services
) -> None:
    conn = await connect(port, make_token())
    assert await conn.recv() is None
    assert conn.close_code == 4001
    assert conn.close_reason == reason
    assert state.registry.authenticated == 0


@pytest.mark.gen_test
async def test_frames_pipelined_behind_a_bad_token_are_never_processed(
    port: int, state: Services
) -> None:
    conn = await connect(port, mint(ttl=-60))
    # Sent without waiting for anything: they arrive right behind the upgrade.
    # The server cuts the connection once its close frame is out, so writes
    # on this side may fail, at once or later; that is the point.
    writes = []
    with contextlib.suppress(WebSocketClosedError):
        for n in range(20):
            writes.append(conn.raw.write_message(json.dumps({"type": "join", "room": "r", "id": n})))
            writes.append(conn.raw.write_message(json.dumps({"type": "echo", "data": n})))
    assert await conn.recv() is None
    assert conn.close_code == 4001
    for write in writes:
        with contextlib.suppress(WebSocketClosedError):
            await write
    assert len(state.hub) == 0
    assert sum(labelled(state.metrics.messages).values()) == 0


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_connections_per_user": "2"}])
async def test_user_cap_upgrades_then_closes_4008(port: int) -> None:
    a = await welcomed(port, mint("alice"))
    b = await welcomed(port, mint("alice"))
    c = await connect(port, mint("alice"))
    assert await c.recv() is None
    assert c.close_code == 4008
    other = await welcomed(port, mint("bob"))  # other users unaffected
    for conn in (a, b, other):
        await conn.close()


@pytest.mark.gen_test
async def test_token_sources(port: int) -> None:
    via_sub = await connect(port, None, subprotocols=["bearer", mint("sub-user")])
    welcome = await via_sub.recv()
    assert welcome is not None and welcome["user"] == "sub-user"
    # The server selects "bearer" and never echoes the token back.
    assert via_sub.subprotocol == "bearer"
    await via_sub.close()
    via_query = await connect(port, None, query=f"?token={mint('query-user')}")
    welcome = await via_query.recv()
    assert welcome is not None and welcome["user"] == "query-user"
    await via_query.close()
    # The header wins over the others.
    both = await connect(port, mint("header-user"), subprotocols=["bearer", mint("x")])
    welcome = await both.recv()
    assert welcome is not None and welcome["user"] == "header-user"
    assert both.subprotocol is None
    await both.close()


@pytest.mark.gen_test
async def test_welcome_carries_user_expiry_and_limits(port: int) -> None:
    tok = mint("alice", ttl=300)
    conn = await connect(port, tok)
    welcome = await conn.recv()
    assert welcome is not None
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert welcome["type"] == "welcome"
    assert welcome["user"] == "alice"
    assert welcome["expires_at"] == claims["exp"]
    assert welcome["limits"]["message_rate"] == 10
    assert welcome["limits"]["max_message_size"] == 65536
    await conn.close()


@pytest.mark.gen_test
async def test_plain_get_on_ws_is_400(http_server: Any, http_client: Any, base_url: str) -> None:
    response = await http_client.fetch(base_url + "/ws", raise_error=False)
    assert response.code == 400
