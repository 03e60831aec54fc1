"""Tokens: where the handshake carries one, and what makes one valid.

Verification is pyjwt's: only the configured algorithms are passed to
``jwt.decode`` (never ``none``, never an algorithm the token itself names),
with ``exp`` and ``sub`` required, ``aud``/``iss`` checked when configured and
a small leeway for clock skew. Optionally (RFC 8725): an explicit ``typ``
header, and a bound on a token's lifetime (``exp - iat``).

Demo tokens (``POST /auth/demo-token``) carry their own audience,
:data:`DEMO_AUDIENCE`, and no issuer, so that another service trusting the
same key and checking its own ``aud`` never takes one for a production token.
"""

from __future__ import annotations

import binascii
import json
import logging
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.utils import base64url_decode

from wsserver.config import HMAC_ALGORITHMS
from wsserver.errors import TokenExpired, TokenInvalid
from wsserver.internals import pyjwt_jws
from wsserver.rooms import NO_GRANTS, Grants, compile_patterns

if TYPE_CHECKING:
    from wsserver.jwks import KeySet

log = logging.getLogger("wsserver.auth")

BEARER_SUBPROTOCOL = "bearer"
MAX_SUB_LENGTH = 256
#: The ``aud`` of demo tokens; only a server with ``--demo`` on accepts it.
DEMO_AUDIENCE = "wsserver-demo"
#: Where a connection's credentials came from: a token's place, the connect
#: proxy, or "ticket": ``GET /sse?ticket=`` (HTTP streaming), which stands for
#: the token given to ``POST /auth/ticket``.
TokenSource = Literal["header", "subprotocol", "query", "proxy", "ticket"]


@dataclass(frozen=True)
class Credentials:
    """A token as the client presented it, and where it came from."""

    token: str = field(repr=False)
    source: TokenSource


def extract_token(
    authorization: str | None, subprotocols: Sequence[str], query_token: str | None
) -> Credentials | None:
    """The first token offered, in the contract's order.

    Args:
        authorization: the ``Authorization`` header (``Bearer <jwt>``).
        subprotocols: the offered ``Sec-WebSocket-Protocol`` list; a token is
            offered as the pair ``bearer, <jwt>``.
        query_token: the ``token`` query parameter.
    """
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return Credentials(value.strip(), "header")
    token = bearer_subprotocol_token(subprotocols)
    if token:
        return Credentials(token, "subprotocol")
    if query_token:
        return Credentials(query_token, "query")
    return None


def looks_like_jwt(token: str) -> bool:
    """True when ``token`` has the shape of a JWT (a compact JWS, RFC 7515 section 7.1):
    three base64url parts, the first a JSON object naming an ``alg``.

    With the connect proxy on, an ``Authorization: Bearer`` value of any other
    shape (an application's own session token) is not verified as a JWT: it
    goes to the backend with the other headers.
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[0]:
        return False
    try:
        header = json.loads(base64url_decode(parts[0]))
    except (ValueError, TypeError, UnicodeDecodeError, binascii.Error):
        return False
    return isinstance(header, dict) and isinstance(header.get("alg"), str)


def bearer_subprotocol_token(subprotocols: Sequence[str]) -> str | None:
    """The token of a ``bearer, <jwt>`` subprotocol pair, if offered."""
    for index, name in enumerate(subprotocols[:-1]):
        if name == BEARER_SUBPROTOCOL:
            return subprotocols[index + 1] or None
    return None


class UnknownKey(TokenInvalid):
    """The token's ``kid`` is not in the key set (yet): a rotation, or a forgery."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a valid token speaks for, and until when.

    Only what the server uses is kept: one of these lives as long as its
    connection, and thousands of connections are the normal case. ``grants``
    come from the ``rooms`` and ``publish`` claims; tokens without them share
    :data:`wsserver.rooms.NO_GRANTS`.
    """

    user: str
    #: Unix seconds; ``math.inf`` when nothing ends it (a connect proxy's
    #: answer without ``expires_at``).
    expires_at: float
    grants: Grants = NO_GRANTS


class TokenVerifier:
    """Verifies JWTs against one key and a fixed list of algorithms.

    Args:
        key: the HMAC secret, or the PEM text of a public key; None with
            ``key_set``, or when no token can be valid (a server whose
            connections all come through the connect proxy).
        algorithms: the accepted algorithms, all of one family.
        key_set: keys by ``kid`` from a JWKS URL (:class:`~wsserver.jwks.KeySet`).
        audience, issuer: required ``aud`` / ``iss`` values, when not None.
        leeway: seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
    """

    def __init__(
        self,
        key: str | None,
        algorithms: Iterable[str],
        *,
        key_set: KeySet | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        typ: str | None = None,
        max_lifetime: float | None = None,
        accept_demo: bool = False,
        clock: Any = time.time,
    ) -> None:
        self.algorithms = [alg for alg in algorithms if alg.lower() != "none"]
        if not self.algorithms:
            raise ValueError("no usable algorithm")
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.typ = _media_type(typ) if typ else None
        self.max_lifetime = max_lifetime
        self.accept_demo = accept_demo
        self._clock = clock
        self.key_set = key_set
        self._key: Any = None
        if key is None:
            pass  # the key set's keys, or none at all (a connect proxy alone)
        elif all(alg in HMAC_ALGORITHMS for alg in self.algorithms):
            self._key = key.encode("utf-8")
        else:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            # Parsed once here, not on every handshake.
            self._key = load_pem_public_key(key.encode("utf-8"))
        required = ["exp", "sub"] + (["iat"] if max_lifetime is not None else [])
        self._jwt = jwt.PyJWT(options={"require": required})
        if isinstance(self._key, bytes):
            _prepare_hmac_key_once(self._jwt, self._key, self.algorithms)

    def verify(self, token: str) -> Identity:
        """The identity a token carries.

        Raises:
            TokenExpired: the token is past ``exp`` (plus leeway).
            TokenInvalid: anything else wrong: malformed, bad signature, algorithm
                not allowed, wrong ``aud``/``iss``/``typ``, not yet valid, no
                ``sub`` or a ``sub`` with control characters, lived too long, a
                ``room`` claim (a subscription token). :class:`UnknownKey` when
                its ``kid`` is not in the key set (yet).
        """
        claims = self._claims(token)
        if "room" in claims:
            # A subscription token grants one room; it must not open a connection.
            raise _invalid("a 'room' claim: a subscription token",
                           "invalid token: a subscription token cannot open a connection")
        try:
            grants = Grants.from_claims(claims)
        except TokenInvalid as exc:
            log.info("token rejected: %s", exc.reason)
            raise
        return Identity(user=claims["sub"], expires_at=float(claims["exp"]), grants=grants)

    async def verify_fresh(self, token: str) -> Identity:
        """:meth:`verify`, refetching the key set once when the ``kid`` is unknown
        (rate-limited by the key set; never blocks the loop)."""
        try:
            return self.verify(token)
        except UnknownKey:
            if self.key_set is None or not await self.key_set.refresh():
                raise
        return self.verify(token)

    async def verify_subscription(self, token: str, user: str, room: str) -> bool:
        """Check a subscription token for ``user`` and ``room``; True when it also
        grants publishing (``"publish": true``).

        Raises:
            TokenInvalid: invalid, expired, another user's, another room's; its
                ``reason`` says which (for a ``forbidden`` answer).
        """
        try:
            claims = self._claims(token)
        except UnknownKey:
            if self.key_set is None or not await self.key_set.refresh():
                raise
            claims = self._claims(token)
        if claims["sub"] != user:
            raise TokenInvalid("subscription token issued for another user")
        claimed = claims.get("room")
        if claimed is None:
            raise TokenInvalid("not a subscription token: it has no 'room' claim")
        if claimed != room:
            raise TokenInvalid("subscription token issued for another room")
        return claims.get("publish") is True

    def _claims(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``, with a usable ``sub`` and ``exp``."""
        try:
            try:
                decoded = self._decode(token, self.audience, self.issuer)
            except (jwt.InvalidAudienceError, jwt.InvalidIssuerError,
                    jwt.MissingRequiredClaimError):
                # A demo token has its own audience and no issuer: accepted
                # only with --demo, and only when its aud is DEMO_AUDIENCE.
                if not self.accept_demo:
                    raise
                decoded = self._decode(token, DEMO_AUDIENCE, None)
        except jwt.ExpiredSignatureError:
            raise TokenExpired() from None
        except jwt.InvalidTokenError as exc:
            raise _invalid(type(exc).__name__) from None
        except (ValueError, TypeError) as exc:
            # Keys or tokens that the crypto layer chokes on.
            raise _invalid(type(exc).__name__) from None
        header = decoded["header"]
        claims: dict[str, Any] = decoded["payload"]
        if self.typ is not None:
            typ = header.get("typ")
            if not isinstance(typ, str) or _media_type(typ) != self.typ:
                raise _invalid(f"typ is not {self.typ!r}")
        sub = claims.get("sub")
        problem = user_problem(sub)
        if problem is not None:
            raise _invalid(f"sub {problem}")
        exp: Any = claims.get("exp")
        if not _is_number(exp):
            raise _invalid("exp is not a number")
        if self.max_lifetime is not None:
            iat: Any = claims.get("iat")
            if not _is_number(iat) or exp - iat > self.max_lifetime:
                raise _invalid(f"no iat, or lifetime above {self.max_lifetime:g}s",
                               "invalid token: lifetime too long")
        return claims

    def _decode(self, token: str, audience: str | None, issuer: str | None) -> dict[str, Any]:
        key, algorithms = self._key_for(token)
        decoded: dict[str, Any] = self._jwt.decode_complete(
            token,
            key,
            algorithms=algorithms,
            audience=audience,
            issuer=issuer,
            leeway=self.leeway,
        )
        return decoded

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        """The key that verifies ``token``, and the algorithms it may be signed with.

        From a key set, the key is chosen by the token's ``kid`` and binds its
        own algorithm (never the one the token names, RFC 8725 section 3.1).
        """
        if self.key_set is None:
            if self._key is None:
                raise _invalid("no key is configured for tokens",
                               "invalid token: this server accepts no tokens")
            return self._key, self.algorithms
        kid = jwt.get_unverified_header(token).get("kid")
        if not isinstance(kid, str) or not kid:
            raise _invalid("no 'kid' in its header (the key set is chosen by kid)")
        found = self.key_set.get(kid)
        if found is None:
            # Fetched again in the background (rate-limited): a synchronous
            # caller (a refresh) fails this once; the next one finds the key.
            self.key_set.refresh_soon()
            error = UnknownKey()
            error.detail = f"unknown kid {kid[:64]!r}"
            raise error
        key, algorithm = found
        return key, [algorithm]


class _PreparedHMAC(HMACAlgorithm):
    """HMAC whose check of the server's key ran once, not on every token.

    PyJWT's ``prepare_key`` refuses PEM, SSH, DER and JWK-looking HMAC keys
    (algorithm-confusion defences) by trying to parse the key each time: two
    failed ``cryptography`` loads and a failed ``json.loads`` per handshake,
    about a third of verifying a token. The server's key never changes, so
    the verdict is kept for that one key object; any other key is checked
    as PyJWT always does.
    """

    def __init__(self, hash_alg: Any, key: bytes) -> None:
        super().__init__(hash_alg)
        self._key = key
        self._prepared = super().prepare_key(key)

    def prepare_key(self, key: str | bytes) -> bytes:
        if key is self._key:
            return self._prepared
        return super().prepare_key(key)


def _prepare_hmac_key_once(decoder: jwt.PyJWT, key: bytes, algorithms: Sequence[str]) -> None:
    """Register :class:`_PreparedHMAC` for ``algorithms`` on ``decoder``'s own PyJWS.

    Through PyJWS's public ``register_algorithm``, on the PyJWS the decoder
    uses (:func:`wsserver.internals.pyjwt_jws`); without one nothing changes.
    """
    jws = pyjwt_jws(decoder)
    if jws is None:
        return
    hashes = {"HS256": HMACAlgorithm.SHA256, "HS384": HMACAlgorithm.SHA384,
              "HS512": HMACAlgorithm.SHA512}  # fmt: skip
    for alg in algorithms:
        if alg in hashes:
            try:
                prepared = _PreparedHMAC(hashes[alg], key)
            except jwt.InvalidKeyError:
                return  # a key PyJWT refuses keeps being refused, token by token
            jws.unregister_algorithm(alg)
            jws.register_algorithm(alg, prepared)


def user_problem(user: object) -> str | None:
    """What makes ``user`` unfit as a user name (a token's ``sub``, a backend's
    ``user``), or None."""
    if not isinstance(user, str) or not user or len(user) > MAX_SUB_LENGTH:
        return f"missing, empty or longer than {MAX_SUB_LENGTH} characters"
    if _has_control(user):
        # A newline or an escape sequence in a user name would forge log lines.
        return "holds control characters"
    return None


def _invalid(detail: str, reason: str | None = None) -> TokenInvalid:
    """A :class:`TokenInvalid` that tells the operator why (``detail``, for the
    server's log line) and the client only ``reason``."""
    log.debug("token rejected: %s", detail)
    error = TokenInvalid(reason)
    error.detail = detail
    return error


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _has_control(text: str) -> bool:
    """Category C (controls, format, unassigned, private use, surrogates), and
    the line and paragraph separators, which also break a log line."""
    return not text.isprintable() and any(
        unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp")
        for ch in text
    )


def _media_type(typ: str) -> str:
    """``typ`` compared as RFC 7515 section 4.1.9 says: case-insensitively, with
    the ``application/`` prefix optional."""
    lowered = typ.strip().lower()
    return lowered.removeprefix("application/")


class TokenIssuer:
    """Signs tokens with an HMAC secret (the ``token`` command, demo tokens)."""

    def __init__(
        self,
        secret: str,
        algorithm: str = "HS256",
        *,
        audience: str | None = None,
        issuer: str | None = None,
        typ: str | None = None,
        clock: Any = time.time,
    ) -> None:
        if algorithm not in HMAC_ALGORITHMS:
            raise ValueError("only HMAC algorithms can sign here")
        self._secret = secret.encode("utf-8")
        self.algorithm = algorithm
        self.audience = audience
        self.issuer = issuer
        self.typ = typ
        self._clock = clock

    def issue(
        self,
        user: str,
        ttl: float,
        *,
        rooms: Sequence[str] | None = None,
        publish: Sequence[str] | None = None,
        demo: bool = False,
    ) -> tuple[str, int]:
        """A signed token for ``user`` valid ``ttl`` seconds, and its ``exp``.

        ``rooms`` and ``publish`` become the claims of the same names (room
        names or ``prefix*``); None leaves the claim out. With ``demo``, the
        token's ``aud`` is :data:`DEMO_AUDIENCE`, it has no ``iss`` and carries
        ``"demo": true``: no service checking its own audience accepts it.

        Raises:
            ValueError: an entry the verifier would refuse (so no token is
                minted that could never connect).
        """
        now = int(self._clock())
        exp = now + max(1, int(ttl))
        claims: dict[str, Any] = {"sub": user, "iat": now, "nbf": now, "exp": exp}
        for claim, entries in (("rooms", rooms), ("publish", publish)):
            if entries is None:
                continue
            try:
                compile_patterns(list(entries), claim)
            except TokenInvalid as exc:
                raise ValueError(exc.reason.removeprefix("invalid token: ")) from None
            claims[claim] = list(entries)
        if demo:
            claims["aud"] = DEMO_AUDIENCE
            claims["demo"] = True
        else:
            if self.audience:
                claims["aud"] = self.audience
            if self.issuer:
                claims["iss"] = self.issuer
        headers = {"typ": self.typ} if self.typ else None
        return jwt.encode(claims, self._secret, algorithm=self.algorithm, headers=headers), exp
