"""What the server's log tells an operator: origin warnings, a quiet access log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.support.clients import welcomed_sync
from tests.support.http import fetch
from tests.support.tokens import KEYED_ENV as KEY_ENV


def test_no_allowed_origin_is_a_warning_at_start(run_server: Callable[..., Any]) -> None:
    srv = run_server(env=KEY_ENV)
    line = srv.wait_for_log(r"WARNING .*allowed origins: none.*").group(0)
    assert "--allowed-origins" in line and "1006" in line


def test_configured_origins_are_listed_without_a_warning(run_server: Callable[..., Any]) -> None:
    srv = run_server("--allowed-origins", "https://*.example.com,https://a.example",
                     env=KEY_ENV)
    srv.wait_for_log(r"INFO .*allowed origins: https://\*\.example\.com, https://a\.example")
    assert "allowed origins: none" not in srv.logs()


def test_the_event_loop_is_uvloop_by_default_and_asyncio_on_request(
    run_server: Callable[..., Any],
) -> None:
    srv = run_server()
    srv.wait_for_log(r"INFO .*broker: memory, .*, event loop: uvloop \d")
    srv = run_server("--loop", "asyncio", env=KEY_ENV)
    srv.wait_for_log(r"INFO .*broker: memory, .*, event loop: asyncio$")
    # The asyncio loop serves a WebSocket session as the default does.
    client = welcomed_sync(srv)
    assert client.ask({"type": "echo", "data": [1]})["data"] == [1]
    client.close()


def test_probes_and_polls_are_not_access_logged(run_server: Callable[..., Any]) -> None:
    srv = run_server()
    for path in ("/healthz", "/readyz", "/stats", "/metrics", "/healthz"):
        fetch(srv.url + path)
    fetch(srv.url + "/")  # a page load is still a line of its own, and comes after the polls
    srv.wait_for_log(r"wsserver\.access: 200 GET / ")
    access = [line for line in srv.logs().splitlines() if "wsserver.access" in line]
    assert len(access) == 1, access


def refused_handshake(srv: Any) -> None:
    """A WebSocket handshake without a token: the server logs "handshake refused"."""
    answer = fetch(srv.url + "/ws", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    })
    assert answer.status == 403


def test_no_access_log_keeps_requests_out_of_the_log(run_server: Callable[..., Any]) -> None:
    srv = run_server("--no-access-log")
    fetch(srv.url + "/")
    fetch(srv.url + "/healthz")
    fetch(srv.url + "/nope")  # a 404 is not logged either
    # Logged after the requests above were: once it is read, their lines would be too.
    refused_handshake(srv)
    srv.wait_for_log("handshake refused")
    assert "wsserver.access" not in srv.logs()
