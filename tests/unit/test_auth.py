"""Token extraction and verification with pyjwt."""

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support.tokens import SECRET, mint
from wsserver.auth import (
    DEMO_AUDIENCE,
    TokenIssuer,
    TokenVerifier,
    extract_token,
    looks_like_jwt,
)
from wsserver.errors import TokenExpired, TokenInvalid
from wsserver.rooms import NO_GRANTS

#: Another key than the verifiers': a token signed with it is forged.
OTHER = "other-secret-0123456789-0123456789-ab"


def good(**extra: Any) -> dict[str, Any]:
    """The claims :func:`mint` writes by default, plus ``extra``."""
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
    identity = HS.verify(mint())
    assert identity.user == "alice"
    assert identity.expires_at > time.time()


@pytest.mark.parametrize(
    ("verifier", "token", "error"),
    [
        (HS, mint("a", ttl=-5), TokenExpired),
        (HS, mint(key=OTHER), TokenInvalid),
        (HS, mint(algorithm="HS512", key=SECRET * 2), TokenInvalid),  # not allowed
        (HS, mint(None, ttl=60), TokenInvalid),  # no sub
        (HS, mint("a", ttl=None), TokenInvalid),  # no exp
        (HS, mint(5, ttl=60), TokenInvalid),
        (HS, mint("", ttl=60), TokenInvalid),
        # Minted at collection: a day ahead stays ahead however late the test runs.
        (HS, mint(nbf=int(time.time()) + 86400), TokenInvalid),
        (HS, mint(aud="someone-else"), TokenInvalid),  # aud not expected
        (HS, "not-a-token", TokenInvalid),
        (HS, "a.b.c", TokenInvalid),
        (HS, mint(key=None, algorithm="none"), TokenInvalid),
        (AUD, mint(), TokenInvalid),  # aud/iss required
        (AUD, mint(aud="chat", iss="https://evil"), TokenInvalid),
        (AUD, mint(aud="other", iss="https://idp"), TokenInvalid),
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
    assert AUD.verify(mint(aud="chat", iss="https://idp")).user == "alice"


def test_leeway_accepts_small_skew() -> None:
    verifier = TokenVerifier(SECRET, ["HS256"], leeway=30)
    assert verifier.verify(mint("a", ttl=-5)).user == "a"


def _pem(private: Any) -> tuple[str, str]:
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public.decode(), private


def test_public_key_algorithms_and_confusion() -> None:
    rsa_public, rsa_private = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    verifier = TokenVerifier(rsa_public, ["RS256"], leeway=0)
    assert verifier.verify(mint(key=rsa_private, algorithm="RS256")).user == "alice"
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
        verifier.verify(mint(key=ec_private, algorithm="ES256"))
    es = TokenVerifier(ec_public, ["ES256"], leeway=0)
    assert es.verify(mint(key=ec_private, algorithm="ES256")).user == "alice"


def test_issuer_round_trip() -> None:
    issuer = TokenIssuer(SECRET, "HS256", audience="chat", issuer="https://idp")
    token, exp = issuer.issue("bob", 60)
    identity = AUD.verify(token)
    assert identity.user == "bob"
    assert identity.expires_at == exp


def test_grants_come_from_the_rooms_and_publish_claims() -> None:
    identity = HS.verify(mint(rooms=["chat:*", "lobby"], publish=["lobby"]))
    assert identity.grants.can_join("chat:1") and identity.grants.can_join("lobby")
    assert not identity.grants.can_join("chatter")
    assert identity.grants.can_publish("lobby") and not identity.grants.can_publish("chat:1")


def test_a_token_without_grant_claims_shares_the_empty_grants() -> None:
    assert HS.verify(mint()).grants is NO_GRANTS
    assert HS.verify(mint()).grants is HS.verify(mint(sub="bob")).grants


@pytest.mark.parametrize(
    "claims",
    [{"rooms": "chat:*"}, {"rooms": None}, {"publish": [1]}, {"rooms": ["a*b"]}, {"rooms": ["**"]}],
)
def test_malformed_grant_claims_make_the_token_invalid(claims: dict[str, Any]) -> None:
    with pytest.raises(TokenInvalid) as info:
        HS.verify(mint(**claims))
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


# --- hardening (issue 13, items 2, 7b, 9) ----------------------------------


@pytest.mark.parametrize(
    "sub", ["alice\nINFO forged line", "a\rb", "a\x1b[31m", "a\u2028b", "a\u200eb", "a\x00"]
)
def test_sub_with_control_characters_is_invalid(sub: str) -> None:
    with pytest.raises(TokenInvalid):
        TokenVerifier(SECRET, ["HS256"]).verify(mint(sub=sub))


def test_sub_with_ordinary_unicode_is_fine() -> None:
    assert TokenVerifier(SECRET, ["HS256"]).verify(mint(sub="Zoë 😀")).user == "Zoë 😀"


@pytest.mark.parametrize(
    ("header_typ", "accepted"),
    [("at+jwt", True), ("AT+JWT", True), ("application/at+jwt", True), ("JWT", False),
     (None, False)],
)
def test_explicit_typ(header_typ: str | None, accepted: bool) -> None:
    verifier = TokenVerifier(SECRET, ["HS256"], typ="at+jwt")
    headers = {"typ": header_typ} if header_typ else None
    token = mint(headers=headers)
    if header_typ is None:
        # pyjwt writes typ=JWT unless told otherwise; drop it altogether.
        token = jwt.api_jws.PyJWS().encode(
            jwt.utils.force_bytes(__import__("json").dumps(good())), SECRET, "HS256",
            headers={"typ": None},
        )
    if accepted:
        assert verifier.verify(token).user == "alice"
    else:
        with pytest.raises(TokenInvalid):
            verifier.verify(token)


def test_without_typ_setting_any_typ_passes() -> None:
    assert TokenVerifier(SECRET, ["HS256"]).verify(mint(headers={"typ": "x"}))


def test_max_lifetime_requires_iat_and_bounds_exp_minus_iat() -> None:
    verifier = TokenVerifier(SECRET, ["HS256"], max_lifetime=3600)
    now = int(time.time())
    assert verifier.verify(mint(iat=now, exp=now + 3600)).user == "alice"
    ten_years = mint(iat=now, exp=now + 10 * 365 * 86400)
    with pytest.raises(TokenInvalid) as info:
        verifier.verify(ten_years)
    assert info.value.reason == "invalid token: lifetime too long"
    with pytest.raises(TokenInvalid):
        verifier.verify(mint())  # no iat
    # Without the setting, neither is asked for.
    assert TokenVerifier(SECRET, ["HS256"]).verify(ten_years).user == "alice"


def test_issuer_writes_the_configured_typ() -> None:
    token, _ = TokenIssuer(SECRET, typ="at+jwt").issue("bob", 60)
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    assert TokenVerifier(SECRET, ["HS256"], typ="at+jwt").verify(token).user == "bob"


def test_demo_tokens_have_their_own_audience_and_no_issuer() -> None:
    issuer = TokenIssuer(SECRET, audience="prod-app", issuer="https://idp.example")
    demo, _ = issuer.issue("mallory", 60, demo=True)
    claims = jwt.decode(demo, options={"verify_signature": False})
    assert claims["aud"] == DEMO_AUDIENCE and claims["demo"] is True and "iss" not in claims
    # Another service with the same key checking its own audience refuses it ...
    prod = TokenVerifier(SECRET, ["HS256"], audience="prod-app", issuer="https://idp.example")
    with pytest.raises(TokenInvalid):
        prod.verify(demo)
    # ... and so does one that checks no audience at all (pyjwt refuses an unexpected aud).
    with pytest.raises(TokenInvalid):
        TokenVerifier(SECRET, ["HS256"]).verify(demo)
    # This server, with --demo on, takes it, and still takes production tokens.
    here = TokenVerifier(SECRET, ["HS256"], audience="prod-app", issuer="https://idp.example",
                         accept_demo=True)
    assert here.verify(demo).user == "mallory"
    assert here.verify(issuer.issue("alice", 60)[0]).user == "alice"
    with pytest.raises(TokenInvalid):
        here.verify(mint(aud="someone-else", iss="https://idp.example"))


def test_the_server_key_is_checked_once_and_every_hmac_algorithm_keeps_working() -> None:
    key = SECRET * 2  # 64+ bytes: enough for HS512
    verifier = TokenVerifier(key, ["HS256", "HS384", "HS512"])
    for algorithm in ("HS256", "HS384", "HS512"):
        assert verifier.verify(mint(algorithm=algorithm, key=key)).user == "alice"
        with pytest.raises(TokenInvalid):  # another key is still another key
            verifier.verify(mint(algorithm=algorithm, key=OTHER * 2))


def test_a_key_pyjwt_refuses_for_hmac_is_still_refused_on_every_token() -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    # Built (config refuses such a key first); PyJWT refuses it on each token.
    verifier = TokenVerifier(pem, ["HS256"])
    forged = jwt.api_jws.PyJWS().encode(
        b'{"sub":"mallory","exp":9999999999}', b"k" * 32, algorithm="HS256")
    for _ in range(2):
        with pytest.raises(jwt.InvalidKeyError):
            verifier.verify(forged)


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (mint("alice"), True),
        ("eyJhbGciOiJub25lIn0.e30.", True),  # {"alg":"none"}: a JWT (refused later)
        ("not.a.jwt", False),
        ("3f9a0c6e2b7d4e1f", False),          # an application's session id
        ("a.b", False),
        ("e30.e30.x", False),                 # {} as a header: no alg
        ("!!!.e30.x", False),
        ("", False),
    ],
)
def test_looks_like_jwt(token: str, expected: bool) -> None:
    assert looks_like_jwt(token) is expected


def test_subscription_tokens_are_checked_for_user_and_room_and_never_open_a_connection() -> None:
    import asyncio

    verifier = TokenVerifier(SECRET, ["HS256"])
    token = mint("alice", room="chat:1", publish=True)
    assert asyncio.run(verifier.verify_subscription(token, "alice", "chat:1")) is True
    assert asyncio.run(verifier.verify_subscription(mint("alice", room="chat:1"), "alice",
                                                    "chat:1")) is False
    for user, room, reason in (("bob", "chat:1", "another user"),
                               ("alice", "chat:2", "another room")):
        with pytest.raises(TokenInvalid) as caught:
            asyncio.run(verifier.verify_subscription(token, user, room))
        assert reason in caught.value.reason
    with pytest.raises(TokenInvalid) as caught:
        verifier.verify(token)
    assert caught.value.reason == "invalid token: a subscription token cannot open a connection"
