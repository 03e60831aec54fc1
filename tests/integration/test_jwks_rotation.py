"""--jwt-jwks-url against a JWKS endpoint the test serves and rotates while the server runs."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from functools import cache
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.support.backend import AppBackend
from tests.support.clients import connect, connect_sync, welcomed, welcomed_sync
from tests.support.http import fetch
from tests.support.metrics import value
from tests.support.servers import ServerFactory
from tests.support.tokens import mint
from tests.support.waiting import poll
from wsserver.services import Services


@cache
def private_key(name: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(name: str) -> dict[str, Any]:
    public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(private_key(name).public_key()))
    return {**public, "kid": name, "use": "sig", "alg": "RS256"}


def signed(kid: str, sub: str = "alice", key: str | None = None, **claims: Any) -> str:
    body = {"sub": sub, "exp": int(time.time()) + 600, **claims}
    return jwt.encode(body, private_key(key or kid), algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def refresh_min() -> str:
    return "0.5"


@pytest.fixture
def server_flags(app_backend: AppBackend, refresh_min: str) -> dict[str, Any]:
    app_backend.jwks = {"keys": [jwk("key-a")]}
    # None removes the test secret the in-process server is keyed with by default.
    return {"jwt_secret": None, "jwt_jwks_url": f"{app_backend.url}/jwks",
            "jwks_refresh_min": refresh_min, "handshake_rate": "1000", "handshake_burst": "1000"}


async def welcomed_or_none(port: int, token: str) -> Any:
    conn = await connect(port, token)
    first = await conn.recv()
    return conn if first is not None and first["type"] == "welcome" else None


@pytest.mark.gen_test
async def test_a_rotation_is_seen_by_the_running_server(
    port: int, app_backend: AppBackend, state: Services
) -> None:
    assert (await welcomed(port, signed("key-a"))).user == "alice"
    # The provider rotates: key-b in, key-a out.
    app_backend.jwks = {"keys": [jwk("key-b")]}
    deadline = time.monotonic() + 10
    while await welcomed_or_none(port, signed("key-b", "bob")) is None:
        assert time.monotonic() < deadline, "key-b never accepted"
        await asyncio.sleep(0.1)
    assert state.key_set is not None and state.key_set.kids == ["key-b"]
    # The withdrawn key no longer verifies anything.
    old = await connect(port, signed("key-a"))
    assert await old.recv() is None and old.close_code == 4001
    assert value(state.metrics.jwks_fetches, outcome="ok") >= 2


@pytest.mark.gen_test
@pytest.mark.parametrize("refresh_min", ["1"])
async def test_random_kids_do_not_hammer_the_identity_provider(
    port: int, app_backend: AppBackend
) -> None:
    before = app_backend.jwks_requests
    started = time.monotonic()
    closes = []
    for _ in range(4):
        conns = await asyncio.gather(*(
            connect(port, signed(secrets.token_hex(8), key="key-a")) for _ in range(15)))
        for conn in conns:
            assert await conn.recv() is None
            closes.append(conn.close_code)
        # The last batch comes 1.2 s or more after the set was fetched at start:
        # past --jwks-refresh-min 1, however fast the handshakes are.
        await asyncio.sleep(0.4)
    elapsed = time.monotonic() - started
    assert closes == [4001] * 60
    fetched = app_backend.jwks_requests - before
    # At most one fetch per second (--jwks-refresh-min 1), whatever 60 kids asked for.
    assert 1 <= fetched <= int(elapsed) + 1, (fetched, elapsed)
    assert (await welcomed(port, signed("key-a"))).user == "alice"


@pytest.mark.gen_test
@pytest.mark.parametrize("refresh_min", ["0.05"])
async def test_the_last_good_keys_are_kept_through_an_outage(
    port: int, app_backend: AppBackend, state: Services
) -> None:
    app_backend.fault("jwks", "500")
    before = app_backend.jwks_requests
    deadline = time.monotonic() + 10
    while app_backend.jwks_requests == before:  # once the interval since the start passed
        assert time.monotonic() < deadline
        unknown = await connect(port, signed("key-new", key="key-a"))
        assert await unknown.recv() is None and unknown.close_code == 4001
    assert value(state.metrics.jwks_fetches, outcome="error") >= 1
    assert (await welcomed(port, signed("key-a"))).user == "alice"
    assert state.ready is None  # /readyz stays 200 (checked over HTTP in the process test)


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [{"join": "token", "publish": "token"}])
async def test_subscription_tokens_are_verified_with_the_key_set(port: int) -> None:
    alice = await welcomed(port, signed("key-a"))
    reply = await alice.ask({"type": "join", "room": "r1", "token": signed("key-a", room="r1")})
    assert reply == {"type": "joined", "room": "r1"}
    reply = await alice.ask({"type": "join", "room": "r2", "token": mint("alice", room="r2")})
    assert reply["code"] == "forbidden"  # HS256 with some secret: not the provider's key


def test_readyz_waits_for_the_first_key_set_then_stays_up_through_an_outage(
    run_server: ServerFactory, app_backend: AppBackend
) -> None:
    app_backend.jwks = {"keys": [jwk("key-a")]}
    app_backend.fault("jwks", "500")
    srv = run_server("--jwt-jwks-url", f"{app_backend.url}/jwks", "--jwks-refresh-min", "0.3")
    answer = fetch(f"{srv.url}/readyz")
    assert (answer.status, answer.json()) == (503, {"status": "jwks_unavailable"})
    app_backend.fault("jwks", None)
    poll(lambda: fetch(f"{srv.url}/readyz").status == 200, "ready once the keys came")
    # The provider goes down: an unknown kid is refused after a refetch is tried...
    app_backend.fault("jwks", "500")
    requests = app_backend.jwks_requests

    def refused_and_refetched() -> bool:
        unknown = connect_sync(srv, signed("key-z", key="key-a"))
        assert unknown.recv() is None and unknown.close_code == 4001
        return app_backend.jwks_requests > requests

    poll(refused_and_refetched, "a refetch tried for an unknown kid")
    # ...and the held keys still verify, and the node stays ready.
    assert welcomed_sync(srv, signed("key-a")).user == "alice"
    assert fetch(f"{srv.url}/readyz").status == 200
    srv.wait_for_log("JWKS .*/jwks: fetch failed: HTTP 500; keeping the 1 key")
