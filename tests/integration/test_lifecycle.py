"""The real process: demo mode, shutdown, logs, endpoints (``python -m wsserver``)."""

from __future__ import annotations

import http.client
import signal
import socket
import urllib.error
from typing import Any

import pytest

from tests.support.aio import run
from tests.support.clients import connect, refused, welcomed
from tests.support.http import fetch
from tests.support.metrics import value
from tests.support.raw import upgrade_request
from tests.support.servers import RunningServer
from tests.support.tokens import KEYED_ENV as KEYED
from tests.support.tokens import SECRET, bearer, mint


def http_get(srv: RunningServer, path: str) -> tuple[int, dict[str, str], bytes]:
    answer = fetch(srv.url + path)
    return answer.status, dict(answer.headers), answer.body


def test_demo_mode_page_token_and_origin(run_server: Any) -> None:
    srv = run_server()
    logs = srv.wait_for_log("DEMO MODE").string
    assert "ephemeral" in logs
    assert srv.host == "127.0.0.1"
    status, headers, body = http_get(srv, "/")
    assert status == 200 and b"<html" in body.lower()
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    reply = srv.get_json("/auth/demo-token", "POST", {"user": "alice"})
    assert reply["expires_in"] == 900

    async def scenario() -> None:
        # The page's own origin is allowed; anything else is refused with 403.
        ws = await connect(srv, subprotocols=["bearer", reply["token"]],
                           origin=f"http://localhost:{srv.port}")
        welcome = await ws.recv()
        assert welcome is not None
        assert welcome["type"] == "welcome" and welcome["user"] == "alice"
        assert ws.subprotocol == "bearer"
        await ws.close()
        refusal = await refused(srv, subprotocols=["bearer", reply["token"]],
                                origin="http://evil.example")
        assert refusal.status == 403

    run(scenario)


@pytest.mark.parametrize("body", [{}, {"user": ""}, {"user": 5}, {"user": "x" * 65}, {"user": "a\u0000b"}])
def test_demo_token_rejects_bad_names(run_server: Any, body: dict[str, Any]) -> None:
    srv = run_server()
    with pytest.raises(urllib.error.HTTPError) as info:
        srv.get_json("/auth/demo-token", "POST", body)
    assert info.value.code == 400
    info.value.close()


def test_demo_token_is_404_with_a_configured_key(run_server: Any) -> None:
    srv = run_server(env=KEYED)
    assert "DEMO MODE" not in srv.logs()
    with pytest.raises(urllib.error.HTTPError) as info:
        srv.get_json("/auth/demo-token", "POST", {"user": "alice"})
    assert info.value.code == 404
    info.value.close()
    # A page may ask first, without a 404 in its console.
    assert srv.get_json("/auth/demo-token") == {"enabled": False, "expires_in": None}


def test_get_demo_token_says_it_is_on_in_demo_mode(run_server: Any) -> None:
    srv = run_server()
    assert srv.get_json("/auth/demo-token") == {"enabled": True, "expires_in": 900}


def test_health_ready_metrics_stats(run_server: Any) -> None:
    srv = run_server(env=KEYED)
    assert srv.get_json("/healthz") == {"status": "ok"}
    assert srv.get_json("/readyz") == {"status": "ready"}
    status, headers, body = http_get(srv, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"wsserver_connections 0.0" in body
    assert SECRET.encode() not in body
    stats = srv.get_json("/stats")
    assert set(stats) >= {"connections", "users", "rooms", "messages", "tasks_in_flight", "uptime"}
    assert http_get(srv, "/nope")[0] == 404


def test_gauge_follows_connections(run_server: Any) -> None:
    srv = run_server(env=KEYED)

    async def scenario() -> None:
        ws = await welcomed(srv, mint())
        assert value(srv, "wsserver_connections") == 1
        await ws.close()
        srv.wait_for_log(r"close user=alice .*code=1000")
        assert value(srv, "wsserver_connections") == 0

    run(scenario)


def test_sigterm_closes_1001_turns_unready_and_exits_0(run_server: Any) -> None:
    srv = run_server("--drain-timeout", "5", env=KEYED)
    keepalive = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    keepalive.request("GET", "/readyz")
    assert keepalive.getresponse().read() == b'{"status": "ready"}'

    async def scenario() -> tuple[int | None, str | None]:
        ws = await welcomed(srv, mint())
        srv.proc.send_signal(signal.SIGTERM)
        code, _ = await ws.until_closed()
        return code, ws.close_reason

    code, reason = run(scenario)
    keepalive.close()
    assert (code, reason) == (1001, "server shutting down")
    assert srv.stop() == 0
    logs = srv.logs()
    assert "shutting down: closing 1 connection(s) with 1001" in logs
    assert "stopped" in logs


def test_readyz_is_503_while_draining(run_server: Any) -> None:
    # A client that never answers the close handshake keeps the drain going.
    srv = run_server("--drain-timeout", "3", env=KEYED)
    keepalive = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    keepalive.request("GET", "/readyz")
    first = keepalive.getresponse()
    assert (first.status, first.read()) == (200, b'{"status": "ready"}')

    raw = socket.create_connection(("127.0.0.1", srv.port))
    raw.sendall(upgrade_request(bearer(mint())))
    assert raw.recv(4096).startswith(b"HTTP/1.1 101")  # then it never reads again
    srv.wait_for_log("open user=alice")
    srv.proc.send_signal(signal.SIGTERM)
    srv.wait_for_log("shutting down")
    keepalive.request("GET", "/readyz")
    response = keepalive.getresponse()
    assert (response.status, response.read()) == (503, b'{"status": "draining"}')
    keepalive.close()
    assert srv.stop() == 0
    raw.close()


def test_query_tokens_and_secrets_stay_out_of_logs(run_server: Any) -> None:
    # At DEBUG the access log also shows upgraded requests (101), with their URI.
    srv = run_server("--log-level", "DEBUG", env=KEYED)
    tok = mint("logged")

    async def scenario() -> None:
        ws = await connect(srv, query=f"?token={tok}")
        await ws.recv()
        await ws.close()

    run(scenario)
    srv.wait_for_log("close user=logged")
    logs = srv.logs()
    assert "token=[redacted]" in logs
    assert tok not in logs
    assert tok.split(".")[2] not in logs
    assert SECRET not in logs


def test_one_log_line_per_open_and_close(run_server: Any) -> None:
    srv = run_server(env=KEYED)

    async def scenario() -> None:
        ws = await welcomed(srv, mint("bob"))
        await ws.close(1000)

    run(scenario)
    line = srv.wait_for_log(r"close user=bob addr=127\.0\.0\.1 code=1000 by=client .*duration=").string
    assert "duration=" in line
    assert len([ln for ln in srv.logs().splitlines() if "open user=bob" in ln]) == 1


def test_warns_when_the_file_limit_cannot_hold_max_connections(run_server: Any) -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    srv = run_server("--max-connections", str(hard + 1), env=KEYED)
    line = srv.wait_for_log("open file limit").string
    assert "WARNING" in line and f"--max-connections {hard + 1}" in line
