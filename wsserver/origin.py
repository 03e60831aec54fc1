"""Origin policy: which browser origins may open a WebSocket.

Browsers do not apply the same-origin policy to WebSockets, and CORS headers
do not protect them: without this check any page a user visits could open a
connection that carries the user's ambient credentials (cookies, HTTP auth).
So the allow list is exact, compared after normalisation (RFC 6454 section
4): scheme and host lower-cased, the default port dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from wsserver.errors import OriginRejected

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in canonical form, or None if not an origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or parts.path or parts.query or parts.fragment:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class OriginPolicy:
    """An exact allow list of origins, normalised once at start."""

    def __init__(self, allowed: Iterable[str]) -> None:
        normalized = set()
        for origin in allowed:
            canonical = normalize_origin(origin)
            if canonical is None:
                raise ValueError(f"not an origin: {origin!r}")
            normalized.add(canonical)
        self.allowed = frozenset(normalized)

    def allows(self, origin: str) -> bool:
        """True when ``origin`` (an ``Origin`` header value) is on the list."""
        canonical = normalize_origin(origin)
        return canonical is not None and canonical in self.allowed

    def check(self, origin: str | None) -> None:
        """Pass requests without ``Origin`` (non-browser clients) or with an allowed one.

        Raises:
            OriginRejected: the header is present and not allowed ("null" included).
        """
        if origin is not None and not self.allows(origin):
            raise OriginRejected(f"origin not allowed: {origin[:200]!r}")
