"""What the core needs of an HTTP client: a POST and a GET, bounded in time and size.

The proxies (:mod:`wsserver.backend`) and the key set (:mod:`wsserver.jwks`)
call out over HTTP; the client that does it lives in the edge
(:class:`wsserver.edge.httpclient.AiohttpClient`, one shared keep-alive pool)
and reaches the core through this interface, so the core does no I/O of its
own and its tests can answer calls from memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

#: The most an answer may weigh: a backend's answer, a key set.
MAX_ANSWER_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """One HTTP answer: its status and its body."""

    status: int
    body: bytes


class HttpFailure(Exception):
    """No usable answer: refused, reset, DNS, TLS, or a body over the size bound.

    Its message names what went wrong and never holds what was sent.
    """


class HttpClient(Protocol):
    """An HTTP client shared by every call of one server."""

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpAnswer:
        """POST ``body`` (JSON) to ``url``; its answer, whatever the status.

        Raises:
            HttpFailure: no answer, or one above :data:`MAX_ANSWER_BYTES`.
            TimeoutError: no full answer within ``timeout`` seconds.
        """
        ...

    async def get(self, url: str, timeout: float) -> HttpAnswer:
        """GET ``url``; as :meth:`post`."""
        ...

    async def close(self) -> None:
        """Close the pooled connections (at shutdown)."""
        ...


def display_url(url: str) -> str:
    """``url`` for a log line: scheme, host, port and path; no credentials, no query."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
