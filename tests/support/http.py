"""The one HTTP helper: one request, its status, headers and body, errors included.

A 4xx or 5xx is an answer to look at, not an exception, so every test reads
``fetch(url).status`` the same way.
"""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Response:
    """One HTTP answer."""

    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def fetch(
    url: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    method: str | None = None,
    source: str | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 10,
) -> Response:
    """``GET url``, or a ``POST`` of ``body`` (bytes as they are, anything else as JSON).

    Args:
        method: another method than the one ``body`` implies.
        source: the local address to connect from (another client to the server).
        context: TLS settings for an ``https`` URL.
    """
    parts = urlsplit(url)
    address = None if source is None else (source, 0)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "127.0.0.1", parts.port,
                                           timeout=timeout, source_address=address,
                                           context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                          timeout=timeout, source_address=address)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request(method or ("GET" if data is None else "POST"), path, body=data,
                     headers=headers or {})
        response = conn.getresponse()
        return Response(response.status, response.msg, response.read())
    finally:
        conn.close()
