"""Token extraction and verification with pyjwt."""

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from wsserver.auth import TokenIssuer, TokenVerifier, extract_token
from wsserver.errors import TokenExpired, TokenInvalid
from wsserver.rooms import NO_GRANTS

SECRET = "unit-secret-0123456789-0123456789-abc"
OTHER = "other-secret-0123456789-0123456789-ab"


def make(claims: dict[str, Any], key: Any = SECRET, alg: str = "HS256", **kw: Any) -> str:
    return jwt.encode(claims, key, algorithm=alg, **kw)


def good(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 600, **extra}


@pytest.mark.parametrize(
    ("authorization", "subprotocols", "query", "expected"),
    [
        ("Bearer h.h.h", ["bearer", "s.s.s"], "q.q.q", ("h.h.h", "header")),
        ("bearer  h.h.h ", [], None, ("h.h.h", "header")),
        (None, ["bearer", "s.s.s"], "q.q.q", ("s.s.s", "subprotocol")),
        (None, ["chat", "bearer", "s.s.s"], None, ("s.s.s", "subprotocol")),
        (None, [], "q.q.q", ("q.q.q", "query")),
        ("Basic dXNlcjpwYXNz", [], "q.q.q", ("q.q.q", "query")),
        ("Bearer ", ["bearer"], None, None),
        (None, ["s.s.s", "bearer"], None, None),
        (None, [], None, None),
    ],
)
def test_extract_token_order(
    authorization: str | None, subprotocols: list[str], query: str | None, expected: Any
) -> None:
    found = extract_token(authorization, subprotocols, query)
    if expected is None:
        assert found is None
    else:
        assert found is not None
        assert (found.token, found.source) == expected
        assert found.token not in repr(found)


HS = TokenVerifier(SECRET, ["HS256"], leeway=0)
AUD = TokenVerifier(SECRET, ["HS256"], audience="chat", issuer="https://idp", leeway=0)


def test_valid_token() -> None:
    identity = HS.verify(make(good()))
    assert identity.user == "alice"
    assert identity.expires_at > time.time()


@pytest.mark.parametrize(
    ("verifier", "token", "error"),
    [
        (HS, make({"sub": "a", "exp": int(time.time()) - 5}), TokenExpired),
        (HS, make(good(), key=OTHER), TokenInvalid),
        (HS, make(good(), alg="HS512", key=SECRET * 2), TokenInvalid),  # not allowed
        (HS, make({"exp": int(time.time()) + 60}), TokenInvalid),  # no sub
        (HS, make({"sub": "a"}), TokenInvalid),  # no exp
        (HS, make({"sub": 5, "exp": int(time.time()) + 60}), TokenInvalid),
        (HS, make({"sub": "", "exp": int(time.time()) + 60}), TokenInvalid),
        (HS, make(good(nbf=int(time.time()) + 300)), TokenInvalid),
        (HS, make(good(aud="someone-else")), TokenInvalid),  # aud not expected
        (HS, "not-a-token", TokenInvalid),
        (HS, "a.b.c", TokenInvalid),
        (HS, jwt.encode(good(), None, algorithm="none"), TokenInvalid),
        (AUD, make(good()), TokenInvalid),  # aud/iss required
        (AUD, make(good(aud="chat", iss="https://evil")), TokenInvalid),
        (AUD, make(good(aud="other", iss="https://idp")), TokenInvalid),
    ],
)
def test_rejected_tokens(verifier: TokenVerifier, token: str, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        verifier.verify(token)
    assert info.value.code == 4001  # type: ignore[attr-defined]


def test_expired_reason_differs_from_invalid() -> None:
    assert TokenExpired().reason == "token expired"
    assert TokenInvalid().reason == "invalid token"


def test_audience_and_issuer_accepted_when_right() -> None:
    assert AUD.verify(make(good(aud="chat", iss="https://idp"))).user == "alice"


def test_leeway_accepts_small_skew() -> None:
    verifier = TokenVerifier(SECRET, ["HS256"], leeway=30)
    assert verifier.verify(make({"sub": "a", "exp": int(time.time()) - 5})).user == "a"


def _pem(private: Any) -> tuple[str, str]:
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public.decode(), private


def test_public_key_algorithms_and_confusion() -> None:
    rsa_public, rsa_private = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    verifier = TokenVerifier(rsa_public, ["RS256"], leeway=0)
    assert verifier.verify(make(good(), key=rsa_private, alg="RS256")).user == "alice"
    # Key confusion: an HS256 token signed with the public key text as secret.
    forged = jwt.api_jws.PyJWS()
    header = {"alg": "HS256", "typ": "JWT"}
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(good()).encode())
    mac = hmac.new(rsa_public.encode(), signing_input, hashlib.sha256).digest()
    confused = (signing_input + b"." + b64(mac)).decode()
    del forged
    with pytest.raises(TokenInvalid):
        verifier.verify(confused)
    ec_public, ec_private = _pem(ec.generate_private_key(ec.SECP256R1()))
    # A token of another key type than the configured one.
    with pytest.raises(TokenInvalid):
        verifier.verify(make(good(), key=ec_private, alg="ES256"))
    es = TokenVerifier(ec_public, ["ES256"], leeway=0)
    assert es.verify(make(good(), key=ec_private, alg="ES256")).user == "alice"


def test_issuer_round_trip() -> None:
    issuer = TokenIssuer(SECRET, "HS256", audience="chat", issuer="https://idp")
    token, exp = issuer.issue("bob", 60)
    identity = AUD.verify(token)
    assert identity.user == "bob"
    assert identity.expires_at == exp


def test_grants_come_from_the_rooms_and_publish_claims() -> None:
    identity = HS.verify(make(good(rooms=["chat:*", "lobby"], publish=["lobby"])))
    assert identity.grants.can_join("chat:1") and identity.grants.can_join("lobby")
    assert not identity.grants.can_join("chatter")
    assert identity.grants.can_publish("lobby") and not identity.grants.can_publish("chat:1")


def test_a_token_without_grant_claims_shares_the_empty_grants() -> None:
    assert HS.verify(make(good())).grants is NO_GRANTS
    assert HS.verify(make(good())).grants is HS.verify(make(good(sub="bob"))).grants


@pytest.mark.parametrize(
    "claims",
    [{"rooms": "chat:*"}, {"rooms": None}, {"publish": [1]}, {"rooms": ["a*b"]}, {"rooms": ["**"]}],
)
def test_malformed_grant_claims_make_the_token_invalid(claims: dict[str, Any]) -> None:
    with pytest.raises(TokenInvalid) as info:
        HS.verify(make(good(**claims)))
    assert info.value.code == 4001
    assert "invalid token: '" in info.value.reason


def test_issuer_mints_grants_and_refuses_malformed_ones() -> None:
    issuer = TokenIssuer(SECRET)
    token, _ = issuer.issue("bob", 60, rooms=["chat:*"], publish=[])
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["rooms"] == ["chat:*"] and claims["publish"] == []
    assert HS.verify(token).grants.can_join("chat:9")
    plain, _ = issuer.issue("bob", 60)
    assert "rooms" not in jwt.decode(plain, SECRET, algorithms=["HS256"])
    with pytest.raises(ValueError, match="'publish' entry 0 has a '\\*' before its end"):
        issuer.issue("bob", 60, publish=["a*b"])
