"""Tokens: where the handshake carries one, and what makes one valid.

Verification is pyjwt's: only the configured algorithms are passed to
``jwt.decode`` (never ``none``, never an algorithm the token itself names),
with ``exp`` and ``sub`` required, ``aud``/``iss`` checked when configured and
a small leeway for clock skew.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt

from wsserver.config import HMAC_ALGORITHMS
from wsserver.errors import TokenExpired, TokenInvalid
from wsserver.rooms import NO_GRANTS, Grants, compile_patterns

log = logging.getLogger("wsserver.auth")

BEARER_SUBPROTOCOL = "bearer"
MAX_SUB_LENGTH = 256
TokenSource = Literal["header", "subprotocol", "query"]


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


def bearer_subprotocol_token(subprotocols: Sequence[str]) -> str | None:
    """The token of a ``bearer, <jwt>`` subprotocol pair, if offered."""
    for index, name in enumerate(subprotocols[:-1]):
        if name == BEARER_SUBPROTOCOL:
            return subprotocols[index + 1] or None
    return None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a valid token speaks for, and until when.

    Only what the server uses is kept: one of these lives as long as its
    connection, and thousands of connections are the normal case. ``grants``
    come from the ``rooms`` and ``publish`` claims; tokens without them share
    :data:`wsserver.rooms.NO_GRANTS`.
    """

    user: str
    expires_at: float
    grants: Grants = NO_GRANTS


class TokenVerifier:
    """Verifies JWTs against one key and a fixed list of algorithms.

    Args:
        key: the HMAC secret, or the PEM text of a public key.
        algorithms: the accepted algorithms, all of one family.
        audience, issuer: required ``aud`` / ``iss`` values, when not None.
        leeway: seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
    """

    def __init__(
        self,
        key: str,
        algorithms: Iterable[str],
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        clock: Any = time.time,
    ) -> None:
        self.algorithms = [alg for alg in algorithms if alg.lower() != "none"]
        if not self.algorithms:
            raise ValueError("no usable algorithm")
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._clock = clock
        self._key: Any
        if all(alg in HMAC_ALGORITHMS for alg in self.algorithms):
            self._key = key.encode("utf-8")
        else:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            # Parsed once here, not on every handshake.
            self._key = load_pem_public_key(key.encode("utf-8"))
        self._jwt = jwt.PyJWT(options={"require": ["exp", "sub"]})

    def verify(self, token: str) -> Identity:
        """The identity a token carries.

        Raises:
            TokenExpired: the token is past ``exp`` (plus leeway).
            TokenInvalid: anything else wrong: malformed, bad signature, algorithm
                not allowed, wrong ``aud``/``iss``, not yet valid, no ``sub``.
        """
        try:
            claims = self._jwt.decode(
                token,
                self._key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired() from None
        except jwt.InvalidTokenError as exc:
            log.info("token rejected: %s", type(exc).__name__)
            raise TokenInvalid() from None
        except (ValueError, TypeError) as exc:
            # Keys or tokens that the crypto layer chokes on.
            log.info("token rejected: %s", type(exc).__name__)
            raise TokenInvalid() from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_LENGTH:
            raise TokenInvalid()
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise TokenInvalid()
        try:
            grants = Grants.from_claims(claims)
        except TokenInvalid as exc:
            log.info("token rejected: %s", exc.reason)
            raise
        return Identity(user=sub, expires_at=float(exp), grants=grants)


class TokenIssuer:
    """Signs tokens with an HMAC secret (the ``token`` command, demo tokens)."""

    def __init__(
        self,
        secret: str,
        algorithm: str = "HS256",
        *,
        audience: str | None = None,
        issuer: str | None = None,
        clock: Any = time.time,
    ) -> None:
        if algorithm not in HMAC_ALGORITHMS:
            raise ValueError("only HMAC algorithms can sign here")
        self._secret = secret.encode("utf-8")
        self.algorithm = algorithm
        self.audience = audience
        self.issuer = issuer
        self._clock = clock

    def issue(
        self,
        user: str,
        ttl: float,
        *,
        rooms: Sequence[str] | None = None,
        publish: Sequence[str] | None = None,
    ) -> tuple[str, int]:
        """A signed token for ``user`` valid ``ttl`` seconds, and its ``exp``.

        ``rooms`` and ``publish`` become the claims of the same names (room
        names or ``prefix*``); None leaves the claim out.

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
        if self.audience:
            claims["aud"] = self.audience
        if self.issuer:
            claims["iss"] = self.issuer
        return jwt.encode(claims, self._secret, algorithm=self.algorithm), exp
