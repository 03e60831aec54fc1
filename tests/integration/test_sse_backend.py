"""HTTP streaming with the connect proxy: a stream without a JWT is the backend's to
decide, as a WebSocket is (``"transport": "sse"``), against a real backend on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.backend import AppBackend
from tests.support.clients import ORIGIN
from tests.support.streams import stream
from wsserver.services import Services

PROXY_KEY = "k" * 40


@pytest.fixture
def server_flags(app_backend: AppBackend, tmp_path: Path) -> dict[str, str]:
    key_file = tmp_path / "proxy.key"
    key_file.write_text(PROXY_KEY + "\n")
    return {**app_backend.proxy_flags("connect"), "proxy_key_file": str(key_file),
            "proxy_timeout": "0.5"}


@pytest.mark.gen_test
async def test_a_session_cookie_opens_a_stream_as_the_backends_user(
    port: int, app_backend: AppBackend
) -> None:
    cookie = app_backend.login("alice")
    client = await stream(port, headers={"Cookie": cookie}, origin=ORIGIN)
    assert client.status == 200, client.body
    welcome = await client.recv()
    assert welcome is not None and welcome["type"] == "welcome"
    assert welcome["user"] == "alice" and "session" in welcome
    client.welcome = welcome
    assert await client.ask({"type": "echo", "data": 1}) == {"type": "echo", "data": 1}
    (call,) = app_backend.calls_of("connect")
    assert call.body == {"transport": "sse", "addr": "127.0.0.1", "origin": ORIGIN,
                         "headers": {"Cookie": cookie}}


@pytest.mark.gen_test
async def test_the_backends_refusal_is_403_before_the_stream(
    port: int, app_backend: AppBackend, state: Services
) -> None:
    refused = await stream(port, headers={"Cookie": "session=unknown"})
    assert refused.status == 403
    assert refused.json() == {"error": "backend_refused", "message": "not logged in",
                              "code": 4003}
    assert state.registry.total == 0
