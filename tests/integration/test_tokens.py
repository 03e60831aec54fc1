"""Live tokens: token_expiring, close 4001 at expiry, in-band refresh."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest

from tests.integration.clients import ask, recv, token, welcomed

SHORT = [{"token_warning": "1", "jwt_leeway": "0"}]


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize("server_flags", SHORT)
async def test_expiry_warns_then_closes_4001(port: int) -> None:
    tok = token(ttl=2)
    conn = await welcomed(port, tok)
    warning = await recv(conn)
    assert warning is not None and warning["type"] == "token_expiring"
    assert warning["expires_at"] > time.time()
    assert await recv(conn) is None
    assert conn.close_code == 4001 and conn.close_reason == "token expired"


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize("server_flags", SHORT)
async def test_refresh_with_same_user_extends_the_connection(port: int) -> None:
    conn = await welcomed(port, token("alice", ttl=2))
    warning = await recv(conn)
    assert warning is not None and warning["type"] == "token_expiring"
    fresh = token("alice", ttl=600)
    reply = await ask(conn, {"type": "refresh", "token": fresh, "id": "r"})
    assert reply["type"] == "refreshed" and reply["id"] == "r"
    assert reply["expires_at"] > time.time() + 500
    # Let the first token's expiry pass: only time can show the timer was moved.
    await asyncio.sleep(max(0.0, warning["expires_at"] + 0.5 - time.time()))
    assert await ask(conn, {"type": "ping"}) == {"type": "pong"}
    assert conn.close_code is None


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda: token("mallory"), "invalid token: issued for another user"),
        (lambda: token("alice", ttl=-30), "token expired"),
        (lambda: token("alice", key="wrong-secret-0123456789-abcdefghijk"), "invalid token"),
        (lambda: "garbage", "invalid token"),
    ],
)
async def test_bad_refresh_closes_4001(port: int, make_token: Callable[[], str], reason: str) -> None:
    conn = await welcomed(port, token("alice"))
    await conn.write_message(json.dumps({"type": "refresh", "token": make_token()}))
    assert await recv(conn) is None
    assert conn.close_code == 4001 and conn.close_reason == reason
