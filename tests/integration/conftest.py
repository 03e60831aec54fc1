"""In-process servers for integration tests (pytest-tornado).

Tests get a real server on a free port through pytest-tornado's
``http_server`` fixture (which must be requested for the app to be served),
with ``server_flags`` overridable per test by parametrizing it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import tornado.web
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from wsserver.app import ServerState, make_app
from wsserver.config import load_settings
from wsserver.origin import OriginPolicy

SECRET = "integration-secret-0123456789-abcdefghij"
ORIGIN = "http://allowed.example"

_clients: list[WebSocketClientConnection] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    """Close every client a test opened, also those the server closed first."""
    yield
    while _clients:
        _clients.pop().close()


@pytest.fixture
def server_flags() -> dict[str, str]:
    """Flags for the in-process server; parametrize this name to change them."""
    return {}


@pytest.fixture
def state(server_flags: dict[str, str]) -> Iterator[ServerState]:
    flags = {"jwt_secret": SECRET, "allowed_origins": ORIGIN, "jwt_leeway": "0"}
    flags.update(server_flags)
    settings = load_settings(flags, {})
    server_state = ServerState.from_settings(settings)
    if settings.default_origins:
        server_state.origins = OriginPolicy(settings.loopback_origins(settings.port))
    yield server_state
    server_state.pool.shutdown()


@pytest.fixture
def app(state: ServerState) -> tornado.web.Application:
    return make_app(state)


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


@pytest.fixture
def port(http_server: Any, http_port: int, state: ServerState) -> int:
    """The port of a running in-process server built from ``server_flags``."""
    return http_port
