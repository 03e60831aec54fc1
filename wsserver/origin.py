"""Origin policy: which browser origins may open a WebSocket.

Browsers do not apply the same-origin policy to WebSockets, and CORS headers
do not protect them: without this check any page a user visits could open a
connection that carries the user's ambient credentials (cookies, HTTP auth).
So the allow list is exact, compared after normalisation (RFC 6454 section
4): scheme and host lower-cased, the default port dropped.

One pattern is supported besides exact origins: a single leading ``*.``
label, as in ``https://*.example.com``. The ``*`` stands for exactly one DNS
label, so it matches ``https://app.example.com`` but never the bare
``https://example.com``, ``https://a.b.example.com``, ``https://evilexample.com``
or ``https://a.example.com.evil.com``. Scheme and port are still exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from wsserver.errors import OriginRejected

_DEFAULT_PORTS = {"http": 80, "https": 443}
#: One DNS label as browsers send it (IDNs arrive as punycode "xn--...").
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_WILDCARD_PREFIX = "*."


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


@dataclass(frozen=True)
class WildcardOrigin:
    """``scheme://*.suffix[:port]``: any one label in front of ``suffix``."""

    scheme: str
    suffix: str  # "example.com", lower case, no leading dot
    port: int | None  # None: the scheme's default port

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return f"{self.scheme}://*.{self.suffix}{port}"

    def matches(self, canonical: str) -> bool:
        """True when the canonical origin ``canonical`` is one label under the suffix."""
        parts = urlsplit(canonical)
        host = parts.hostname or ""
        if parts.scheme != self.scheme or parts.port != self.port:
            return False
        label, dot, rest = host.partition(".")
        return bool(dot) and rest == self.suffix and _LABEL.fullmatch(label) is not None


def origin_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not an allowed-origins entry, or None when it is one."""
    try:
        _compile(pattern)
    except ValueError as exc:
        return str(exc)
    return None


def _compile(pattern: str) -> str | WildcardOrigin:
    """An exact canonical origin, or a :class:`WildcardOrigin`.

    Raises:
        ValueError: with a message a user can act on.
    """
    text = pattern.strip()
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in _DEFAULT_PORTS:
        raise ValueError("use scheme://host[:port] with http or https")
    if "*" not in rest:
        canonical = normalize_origin(text)
        if canonical is None:
            raise ValueError("an origin is scheme://host[:port], with no path")
        return canonical
    if not rest.startswith(_WILDCARD_PREFIX) or "*" in rest[len(_WILDCARD_PREFIX):]:
        raise ValueError("a wildcard is one leading '*.' label only, as in https://*.example.com")
    # Normalise the rest with a stand-in label, then take it apart again.
    canonical = normalize_origin(f"{scheme}://x.{rest[len(_WILDCARD_PREFIX):]}")
    if canonical is None:
        raise ValueError("an origin is scheme://host[:port], with no path")
    parts = urlsplit(canonical)
    suffix = (parts.hostname or "").partition(".")[2]
    labels = suffix.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("'*.' needs a domain of two or more labels after it, such as example.com")
    return WildcardOrigin(parts.scheme, suffix, parts.port)


class OriginPolicy:
    """An allow list of exact origins and ``*.`` patterns, compiled once at start."""

    def __init__(self, allowed: Iterable[str]) -> None:
        exact: set[str] = set()
        wildcards: list[WildcardOrigin] = []
        for origin in allowed:
            try:
                compiled = _compile(origin)
            except ValueError:
                raise ValueError(f"not an origin: {origin!r}") from None
            if isinstance(compiled, WildcardOrigin):
                if compiled not in wildcards:
                    wildcards.append(compiled)
            else:
                exact.add(compiled)
        self.exact = frozenset(exact)
        self.wildcards = tuple(wildcards)
        #: Every entry in canonical form, for the start-up log.
        self.allowed = frozenset(exact | {str(w) for w in wildcards})

    def allows(self, origin: str) -> bool:
        """True when ``origin`` (an ``Origin`` header value) is allowed."""
        canonical = normalize_origin(origin)
        if canonical is None:
            return False
        return canonical in self.exact or any(w.matches(canonical) for w in self.wildcards)

    def check(self, origin: str | None) -> None:
        """Pass requests without ``Origin`` (non-browser clients) or with an allowed one.

        Raises:
            OriginRejected: the header is present and not allowed ("null" included).
        """
        if origin is not None and not self.allows(origin):
            raise OriginRejected(f"origin not allowed: {origin[:200]!r}")
