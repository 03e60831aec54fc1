"""``--broker`` URLs for Redis: checked at start, shown without their password.

Pure: no redis-py here, so ``check-config`` validates a URL without loading it.

* ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...``,
  ``unix:///path``: one Redis (redis-py's own URL forms).
* ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/MASTER[/db]``:
  Redis Sentinel. The hosts are the sentinels (port 26379 by default);
  MASTER is the name they monitor (``sentinel monitor MASTER ...``); the
  user and password are the Redis master's (the sentinels are asked without
  one). ``rediss+sentinel://`` speaks TLS to the master and replicas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]]+))(?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL (``repr`` hides the password)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def __repr__(self) -> str:
        hidden = None if self.password is None else "***"
        return (f"SentinelURL(sentinels={self.sentinels!r}, master={self.master!r}, "
                f"db={self.db}, username={self.username!r}, password={hidden!r}, tls={self.tls})")


def is_sentinel(url: str) -> bool:
    """True for a ``redis+sentinel://`` (or ``rediss+sentinel://``) URL."""
    return url.split("://", 1)[0] in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of a Sentinel URL.

    Raises:
        ValueError: with what is wrong, never the password.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SENTINEL_SCHEMES:
        raise ValueError("a Sentinel URL starts with redis+sentinel://")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels: list[tuple[str, int]] = []
    for item in netloc.split(","):
        found = _HOST.match(item.strip())
        if not found:
            raise ValueError(f"sentinel {item.strip()!r} is not host or host:port")
        port = int(found["port"]) if found["port"] else SENTINEL_PORT
        if not 0 < port < 65536:
            raise ValueError(f"sentinel port {port} is not 1..65535")
        sentinels.append((found["v6"] or found["name"], port))
    parts = [unquote(p) for p in path.split("?", 1)[0].split("/")] if path else []
    if not parts or not parts[0]:
        raise ValueError("a Sentinel URL names the master after the hosts: "
                         "redis+sentinel://host:26379/mymaster/0")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isascii()) or (
        len(parts) == 2 and parts[1] and not parts[1].isdigit()
    ):
        raise ValueError("after the master name comes the database number: /mymaster/0")
    db = int(parts[1]) if len(parts) == 2 and parts[1] else 0
    return SentinelURL(tuple(sentinels), parts[0], db, username, password,
                       tls=scheme == "rediss+sentinel")


def check_url(url: str) -> str:
    """``url`` when it is a broker URL the server can use.

    Raises:
        ValueError: what is wrong with it (without its password).
    """
    if is_sentinel(url):
        parse_sentinel_url(url)
        return url
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError("use 'memory', a redis://, rediss:// or unix:// URL, "
                         "or redis+sentinel://host:port,host:port/MASTER/db")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("a unix:// URL needs the socket's path (unix:///run/redis.sock)")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("a Redis URL needs a host (redis://127.0.0.1:6379/0)")
    return url


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    userinfo, _, hosts = netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return url
    return f"{scheme}://{user}:***@{hosts}{slash}{tail}"
