"""KeySet and TokenVerifier over a key set: fetched from memory, on a fake clock."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.support.aio import run
from tests.support.metrics import value
from wsserver.auth import TokenVerifier, UnknownKey
from wsserver.errors import TokenInvalid
from wsserver.jwks import MAX_AGE, KeySet
from wsserver.metrics import Metrics
from wsserver.outbound import HttpAnswer, HttpFailure

URL = "https://idp.example/realms/app/protocol/openid-connect/certs"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk_of(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    algorithm = RSAAlgorithm if isinstance(public, rsa.RSAPublicKey) else ECAlgorithm
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(public))
    return {**jwk, "kid": kid, **extra}


def sign(key: Any, kid: str | None, alg: str = "RS256", **claims: Any) -> str:
    body = {"sub": "alice", "exp": int(time.time()) + 600, **claims}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(body, key, algorithm=alg, headers=headers)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryJwks:
    """A JWKS endpoint in memory: its document, or a failure; counts GETs."""

    def __init__(self, document: Any) -> None:
        self.document = document
        self.failure: BaseException | None = None
        self.gets = 0
        self.gate: asyncio.Event | None = None

    async def get(self, url: str, timeout: float) -> HttpAnswer:
        self.gets += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return HttpAnswer(200, json.dumps(self.document).encode())

    async def post(self, url: str, body: bytes, headers: Mapping[str, str],
                   timeout: float) -> HttpAnswer:
        raise AssertionError("not used")

    async def close(self) -> None:
        pass


def key_set(http: MemoryJwks, clock: Clock, refresh_min: float = 30.0,
            algorithms: tuple[str, ...] = ("RS256", "ES256")) -> tuple[KeySet, Metrics]:
    metrics = Metrics()
    return KeySet(URL, http, metrics, algorithms=algorithms, refresh_min=refresh_min,
                  clock=clock), metrics


def test_only_usable_signing_keys_are_kept() -> None:
    a, b = rsa_key(), ec.generate_private_key(ec.SECP256R1())
    document = {"keys": [
        jwk_of(a, "a"), jwk_of(b, "b"),
        jwk_of(a, "enc", use="enc"),              # for encryption
        {k: v for k, v in jwk_of(a, "x").items() if k != "kid"},  # no kid
        jwk_of(a, "ps", alg="PS256"),             # an algorithm not accepted
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},  # not a key
        "nonsense",
    ]}

    async def scenario() -> None:
        keys, metrics = key_set(MemoryJwks(document), Clock())
        assert await keys.refresh()
        assert keys.kids == ["a", "b"]
        assert keys.get("b") is not None and keys.get("b")[1] == "ES256"  # type: ignore[index]
        assert value(metrics.jwks_keys) == 2
        assert value(metrics.jwks_fetches, outcome="ok") == 1

    run(scenario)


def test_refetches_are_rate_limited_and_shared() -> None:
    http = MemoryJwks({"keys": [jwk_of(rsa_key(), "a")]})
    clock = Clock()

    async def scenario() -> None:
        keys, _ = key_set(http, clock, refresh_min=30)
        http.gate = asyncio.Event()
        # Many callers at once (a burst of unknown kids): one fetch, shared.
        waiting = [asyncio.ensure_future(keys.refresh()) for _ in range(20)]
        await asyncio.sleep(0.01)
        http.gate.set()
        assert all(await asyncio.gather(*waiting))
        assert http.gets == 1
        # Within the interval: no fetch at all, whatever is asked.
        for _ in range(100):
            keys.refresh_soon()
            assert not await keys.refresh()
        assert http.gets == 1
        clock.now += 30
        assert await keys.refresh()
        assert http.gets == 2

    run(scenario)


def test_a_failed_fetch_keeps_the_last_good_keys() -> None:
    http = MemoryJwks({"keys": [jwk_of(rsa_key(), "a")]})
    clock = Clock()

    async def scenario() -> None:
        keys, metrics = key_set(http, clock, refresh_min=1)
        assert await keys.refresh()
        for failure, outcome in ((HttpFailure("ClientConnectorError"), "error"),
                                 (None, "invalid")):
            http.failure = failure
            if failure is None:
                http.document = {"keys": []}
            clock.now += 1
            assert not await keys.refresh()
            assert keys.kids == ["a"] and keys.ready
            assert value(metrics.jwks_fetches, outcome=outcome) == 1

    run(scenario)


def test_the_periodic_check_fetches_when_empty_or_old() -> None:
    http = MemoryJwks({"keys": [jwk_of(rsa_key(), "a")]})
    clock = Clock()

    async def scenario() -> None:
        keys, _ = key_set(http, clock, refresh_min=10)
        keys.refresh_if_stale()  # never fetched
        await asyncio.sleep(0.01)
        assert http.gets == 1 and keys.ready
        clock.now += 60
        keys.refresh_if_stale()  # fresh enough
        await asyncio.sleep(0.01)
        assert http.gets == 1
        clock.now += MAX_AGE
        keys.refresh_if_stale()
        await asyncio.sleep(0.01)
        assert http.gets == 2

    run(scenario)


def test_the_verifier_chooses_the_key_by_kid_and_binds_its_algorithm() -> None:
    a, b = rsa_key(), ec.generate_private_key(ec.SECP256R1())
    http = MemoryJwks({"keys": [jwk_of(a, "a")]})
    clock = Clock()

    async def scenario() -> None:
        keys, _ = key_set(http, clock, refresh_min=5)
        verifier = TokenVerifier(None, ["RS256", "ES256"], key_set=keys)
        await keys.refresh()
        assert verifier.verify(sign(a, "a")).user == "alice"
        with pytest.raises(TokenInvalid):
            verifier.verify(sign(a, None))  # no kid
        with pytest.raises(TokenInvalid):
            verifier.verify(sign(b, "a", alg="ES256"))  # kid a is an RS256 key
        # A rotation: b appears. Synchronous callers fail until it is fetched...
        http.document = {"keys": [jwk_of(a, "a"), jwk_of(b, "b")]}
        with pytest.raises(UnknownKey):
            verifier.verify(sign(b, "b", alg="ES256"))
        # ...within the interval nothing is fetched; after it, one refetch finds it.
        with pytest.raises(UnknownKey):
            await verifier.verify_fresh(sign(b, "b", alg="ES256"))
        assert http.gets == 1
        clock.now += 5
        identity = await verifier.verify_fresh(sign(b, "b", alg="ES256"))
        assert identity.user == "alice" and http.gets == 2

    run(scenario)


def test_without_any_key_every_token_is_invalid() -> None:
    verifier = TokenVerifier(None, ["HS256"])
    with pytest.raises(TokenInvalid) as caught:
        verifier.verify(jwt.encode({"sub": "a", "exp": 2**40}, "x" * 32, algorithm="HS256"))
    assert caught.value.reason == "invalid token: this server accepts no tokens"
