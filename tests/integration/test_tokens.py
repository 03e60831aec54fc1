"""Live tokens: token_expiring, close 4001 at expiry, in-band refresh."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tests.support.clients import welcomed
from tests.support.tokens import mint

SHORT = [{"token_warning": "1", "jwt_leeway": "0"}]


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize("server_flags", SHORT)
async def test_expiry_warns_then_closes_4001(port: int) -> None:
    tok = mint(ttl=2)
    conn = await welcomed(port, tok)
    warning = await conn.recv()
    assert warning is not None and warning["type"] == "token_expiring"
    assert warning["expires_at"] > time.time()
    assert await conn.recv() is None
    assert conn.close_code == 4001 and conn.close_reason == "token expired"


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize("server_flags", SHORT)
async def test_refresh_with_same_user_extends_the_connection(port: int) -> None:
    conn = await welcomed(port, mint("alice", ttl=2))
    warning = await conn.recv()
    assert warning is not None and warning["type"] == "token_expiring"
    fresh = mint("alice", ttl=600)
    reply = await conn.ask({"type": "refresh", "token": fresh, "id": "r"})
    assert reply["type"] == "refreshed" and reply["id"] == "r"
    assert reply["expires_at"] > time.time() + 500
    # Let the first token's expiry pass: only time can show the timer was moved.
    await asyncio.sleep(max(0.0, warning["expires_at"] + 0.5 - time.time()))
    assert await conn.ask({"type": "ping"}) == {"type": "pong"}
    assert conn.close_code is None


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda: mint("mallory"), "invalid token: issued for another user"),
        (lambda: mint("alice", ttl=-30), "token expired"),
        (lambda: mint("alice", key="wrong-secret-0123456789-abcdefghijk"), "invalid token"),
        (lambda: "garbage", "invalid token"),
    ],
)
async def test_bad_refresh_closes_4001(port: int, make_token: Callable[[], str], reason: str) -> None:
    conn = await welcomed(port, mint("alice"))
    await conn.send({"type": "refresh", "token": make_token()})
    assert await conn.recv() is None
    assert conn.close_code == 4001 and conn.close_reason == reason
