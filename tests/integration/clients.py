"""Test clients for the in-process server: tokens, connections, replies.

A plain module (not a conftest) so that the tests and the conftest's clean-up
fixture share one ``_clients`` list.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

SECRET = "integration-secret-0123456789-abcdefghij"
ORIGIN = "http://allowed.example"

_clients: list[WebSocketClientConnection] = []


def close_all() -> None:
    """Close every client opened so far, also those the server closed first."""
    while _clients:
        _clients.pop().close()


def token(sub: str = "alice", ttl: float = 600, key: str = SECRET, **claims: Any) -> str:
    """An HS256 token like an identity provider would issue."""
    body: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(body, key, algorithm="HS256")


def ws_request(port: int, *, headers: dict[str, str] | None = None, query: str = "") -> HTTPRequest:
    url = f"ws://127.0.0.1:{port}/ws{query}"
    return HTTPRequest(url, headers=headers or {})


async def connect(
    port: int,
    tok: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    subprotocols: list[str] | None = None,
    query: str = "",
) -> WebSocketClientConnection:
    """Open a connection with ``tok`` in the Authorization header."""
    all_headers = dict(headers or {})
    if tok is not None:
        all_headers["Authorization"] = f"Bearer {tok}"
    conn = await websocket_connect(
        ws_request(port, headers=all_headers, query=query), subprotocols=subprotocols
    )
    _clients.append(conn)
    return conn


async def recv(conn: WebSocketClientConnection) -> dict[str, Any] | None:
    """The next JSON message, or None when the server closed."""
    raw = await conn.read_message()
    if raw is None:
        return None
    value: dict[str, Any] = json.loads(raw)
    return value


async def welcomed(port: int, tok: str | None = None, **kw: Any) -> WebSocketClientConnection:
    """A connection past its ``welcome``."""
    conn = await connect(port, tok if tok is not None else token(), **kw)
    first = await recv(conn)
    assert first is not None and first["type"] == "welcome", first
    return conn


async def ask(conn: WebSocketClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    await conn.write_message(json.dumps(message))
    reply = await recv(conn)
    assert reply is not None, f"closed: {conn.close_code} {conn.close_reason}"
    return reply
