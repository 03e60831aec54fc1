"""The one test secret and the one token minter.

Every server a test starts is keyed with :data:`SECRET` (``--jwt-secret``,
:data:`KEYED_ENV`, or ``jwt_secret`` in-process) and every token a test needs
comes from :func:`mint`. A test that needs a *wrong* key or a malformed token
writes that input out where it is used: it is what the test is about.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

#: The HS256 key of every test server: 32+ bytes, as RFC 7518 section 3.2 asks.
SECRET = "test-secret-0123456789-abcdefghijklmnop"
#: The environment that gives a ``python -m wsserver`` process :data:`SECRET`.
KEYED_ENV = {"WSSERVER_JWT_SECRET": SECRET}
#: Grants for every room (``mint(user, **EVERY_ROOM)``), for tests about
#: something other than room permissions.
EVERY_ROOM: dict[str, Any] = {"rooms": ["*"], "publish": ["*"]}


def mint(
    sub: Any = "alice",
    *,
    ttl: float | None = 600,
    key: Any = SECRET,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
    now: float | None = None,
    **claims: Any,
) -> str:
    """A signed token, as an identity provider sharing the key would issue it.

    Args:
        sub: the user (``None`` leaves the claim out).
        ttl: seconds from ``now`` to ``exp`` (negative: expired; ``None``: no ``exp``).
        key: the signing key (:data:`SECRET`, or another one on purpose).
        algorithm: the JWS algorithm.
        headers: extra JOSE header fields (``typ``).
        now: the clock the token is minted by (a test's fake wall clock).
        claims: more claims (``rooms``, ``publish``, ``aud``, ``iat``...); they
            win over ``sub`` and ``exp``.
    """
    at = time.time() if now is None else now
    body: dict[str, Any] = {}
    if sub is not None:
        body["sub"] = sub
    if ttl is not None:
        body["exp"] = int(at + ttl)
    body.update(claims)
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header carrying ``token``."""
    return {"Authorization": f"Bearer {token}"}
