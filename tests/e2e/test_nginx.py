"""Real nginx, configured by the shipped site file, in front of the real server.

Each test starts ``python -m wsserver`` (the ``run_server`` fixture) and an
nginx of its own on free loopback ports, from a generated main config that
includes ``deploy/nginx.conf`` with only the ports changed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.support.aio import run
from tests.support.clients import AsyncClient, connect, refused, welcomed
from tests.support.deploy import NGINX_SITE, Nginx, nginx_available
from tests.support.http import fetch
from tests.support.metrics import value
from tests.support.streams import streamed, ticket
from tests.support.tokens import KEYED_ENV, mint
from tests.support.waiting import until
from wsserver.config import OPTIONS_BY_NAME

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not nginx_available(), reason="needs nginx (Debian: nginx-light)"),
]

SERVER_ENV = KEYED_ENV
#: The site file's limit_req burst; the burst test sends well above it.
NGINX_BURST = 30


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[[int], Nginx]]:
    started: list[Nginx] = []

    def start(upstream_port: int) -> Nginx:
        nginx = Nginx(tmp_path / f"nginx{len(started)}", upstream_port)
        started.append(nginx)
        nginx.start()
        return nginx

    yield start
    for nginx in started:
        nginx.stop()


def get(url: str, source: str | None = None) -> tuple[int, str]:
    """Status and body of ``GET url``, optionally from a given local address."""
    answer = fetch(url, source=source)
    return answer.status, answer.text


def is_from_nginx(body: bytes | bytearray | str) -> bool:
    text = body if isinstance(body, str) else bytes(body).decode(errors="replace")
    return "<center>nginx" in text


def test_welcome_and_pages_through_nginx(run_server: Any, start_nginx: Any) -> None:
    server = run_server("--port", "0", "--trusted-proxies", "127.0.0.1", env=SERVER_ENV)
    nginx = start_nginx(server.port)

    async def scenario() -> None:
        ws = await welcomed(nginx, mint("alice"))
        assert ws.user == "alice"
        reply = await ws.ask({"type": "echo", "data": "via nginx", "id": 1})
        assert reply == {"type": "echo", "data": "via nginx", "id": 1}
        await ws.close()

    run(scenario)
    assert get(nginx.url + "/healthz")[0] == 200, nginx.error_log()
    assert get(nginx.url + "/readyz")[0] == 200, nginx.error_log()
    status, body = get(nginx.url + "/")
    assert status == 200 and "<html" in body.lower(), nginx.error_log()
    assert get(nginx.url + "/static/wsclient.js")[0] == 200, nginx.error_log()


def test_metrics_only_from_loopback(run_server: Any, start_nginx: Any) -> None:
    server = run_server("--port", "0", env=SERVER_ENV)
    nginx = start_nginx(server.port)
    status, body = get(nginx.url + "/metrics")
    assert status == 200 and "wsserver_connections" in body
    # 127.0.0.2 is loopback to the kernel but not on the site's allow list,
    # so it stands in for any other client.
    status, body = get(nginx.url + "/metrics", source="127.0.0.2")
    assert status == 403 and is_from_nginx(body)


def test_a_clients_own_forwarded_for_never_reaches_the_server(
    run_server: Any, start_nginx: Any
) -> None:
    server = run_server(
        "--port", "0", "--trusted-proxies", "127.0.0.1", "--max-connections-per-ip", "1",
        env=SERVER_ENV,
    )
    nginx = start_nginx(server.port)

    async def scenario() -> None:
        # Each client claims another address; nginx sends the one it saw, so
        # the server caps the real address and logs it.
        first = await welcomed(nginx, mint("alice"), headers={"X-Forwarded-For": "203.0.113.7"})
        refusal = await refused(nginx, mint("bob"), headers={"X-Forwarded-For": "198.51.100.9"})
        assert refusal.status == 429
        assert not is_from_nginx(refusal.body or b"")
        # Another real address (127.0.0.2 is loopback too) is not capped.
        other = await welcomed(nginx, mint("carol"), local_addr=("127.0.0.2", 0))
        await other.close()
        await first.close()

    run(scenario)
    # The 429 was the server's per-address cap, counted once.
    assert value(server, "wsserver_rejections_total", reason="address_cap") == 1
    logs = server.logs()
    assert "open user=alice addr=127.0.0.1 " in logs
    assert "open user=carol addr=127.0.0.2 " in logs
    assert "203.0.113.7" not in logs and "198.51.100.9" not in logs


def test_every_location_that_sets_headers_sets_the_forwarding_headers() -> None:
    site = "\n".join(
        line for line in NGINX_SITE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    blocks = re.findall(r"location[^{]*\{[^}]*\}", site)
    setting = [block for block in blocks if "proxy_set_header" in block]
    assert len(setting) == 7, blocks
    for block in setting:
        for header in (r"X-Real-IP\s+\$remote_addr", r"X-Forwarded-For\s+\$remote_addr",
                       r"X-Forwarded-Proto\s+\$scheme"):
            assert re.search(r"proxy_set_header\s+" + header + ";", block), (header, block)
    assert "$proxy_add_x_forwarded_for" not in site


def test_access_log_never_shows_a_query_token(run_server: Any, start_nginx: Any) -> None:
    server = run_server("--port", "0", "--trusted-proxies", "127.0.0.1", env=SERVER_ENV)
    nginx = start_nginx(server.port)
    tok = mint("alice")

    async def scenario() -> None:
        ws = await connect(nginx, query=f"?token={tok}")
        assert (await ws.recv() or {}).get("type") == "welcome"
        await ws.close()

    run(scenario)
    get(nginx.url + "/healthz?x=1&TOKEN=" + tok)  # access_log off there: not logged at all
    get(nginx.url + "/readyz?x=1&Token=" + tok)
    nginx.stop()  # flushes and closes the log
    logged = nginx.access_log.read_text()
    assert tok not in logged
    assert '"GET /ws?[redacted] HTTP/1.1" 101' in logged, logged
    assert '"GET /readyz?[redacted] HTTP/1.1" 200' in logged, logged
    assert tok not in server.logs()


def test_stats_only_from_loopback_and_api_never(run_server: Any, start_nginx: Any) -> None:
    server = run_server("--port", "0", env=SERVER_ENV)
    nginx = start_nginx(server.port)
    status, body = get(nginx.url + "/stats")
    assert status == 200 and "connections" in body
    status, body = get(nginx.url + "/stats", source="127.0.0.2")
    assert status == 403 and is_from_nginx(body)
    for source in (None, "127.0.0.2"):
        for path in ("/api/publish", "/api/rooms", "/api/"):
            status, body = get(nginx.url + path, source=source)
            assert status == 403 and is_from_nginx(body), (path, source)


def test_no_version_in_any_server_header(run_server: Any, start_nginx: Any) -> None:
    server = run_server("--port", "0", env=SERVER_ENV)
    nginx = start_nginx(server.port)
    for url in (nginx.url + "/healthz", nginx.url + "/nope", nginx.url + "/api/x",
                server.url + "/healthz", server.url + "/nope"):
        answer = fetch(url)
        if answer.status >= 400:
            assert "nginx/" not in answer.text, answer.text
        assert answer.headers.get("Server") in (None, "nginx"), (url, answer.headers.get("Server"))


def test_handshake_burst_above_the_limit_is_refused_by_nginx(
    run_server: Any, start_nginx: Any
) -> None:
    # The server's own handshake limit is opened wide so that any refusal
    # below comes from nginx's limit_req.
    server = run_server(
        "--port", "0", "--trusted-proxies", "127.0.0.1",
        "--handshake-rate", "10000", "--handshake-burst", "10000",
        env=SERVER_ENV,
    )
    nginx = start_nginx(server.port)
    attempts = 3 * NGINX_BURST

    async def attempt(index: int, opened: list[AsyncClient]) -> int:
        try:
            ws = await welcomed(nginx, mint(f"user{index}"))
        except InvalidStatus as exc:  # refused before the upgrade
            assert is_from_nginx(exc.response.body or b""), exc.response.body
            return exc.response.status_code
        opened.append(ws)
        return 101

    async def scenario() -> list[int]:
        opened: list[AsyncClient] = []
        try:
            return await asyncio.gather(*(attempt(i, opened) for i in range(attempts)))
        finally:
            await asyncio.gather(*(ws.close() for ws in opened))

    statuses = run(scenario)
    accepted = statuses.count(101)
    refused = statuses.count(429)
    assert accepted + refused == attempts, statuses
    assert refused > 0
    # The burst itself passes: one request plus the burst of 30, no delay.
    assert accepted >= NGINX_BURST
    assert value(server, "wsserver_connections_accepted_total") == accepted
    assert "limiting requests" in nginx.error_log()


def test_site_keeps_idle_websockets_longer_than_the_ping_interval() -> None:
    # Waiting out a real idle timeout would take minutes: read the directives.
    site = "\n".join(
        line for line in NGINX_SITE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    ws_block = site[site.index("location = /ws") :].split("}", 1)[0]
    timeout = re.search(r"^\s*proxy_read_timeout\s+(\d+)s;", ws_block, re.MULTILINE)
    assert timeout is not None
    assert int(timeout.group(1)) > 2 * float(OPTIONS_BY_NAME["ping_interval"].default)
    for directive in (
        r"proxy_http_version\s+1\.1;",
        r"proxy_set_header\s+Upgrade\s+\$http_upgrade;",
        r"proxy_set_header\s+Connection\s+\$connection_upgrade;",
        r"limit_req\s+zone=wsserver_handshake\s+burst=30\s+nodelay;",
    ):
        assert re.search(r"^\s*" + directive, ws_block, re.MULTILINE), directive
    assert re.search(
        r"^\s*limit_req_zone\s+\$binary_remote_addr\s+zone=wsserver_handshake:\S+\s+rate=20r/s;",
        site, re.MULTILINE,
    )


# --- HTTP streaming through nginx (issue 22) -----------------------------------------


def test_stream_events_arrive_through_nginx_as_they_are_sent(
    run_server: Any, start_nginx: Any
) -> None:
    server = run_server("--port", "0", "--trusted-proxies", "127.0.0.1", "--ping-interval", "1",
                        env=SERVER_ENV)
    nginx = start_nginx(server.port)
    grants = {"rooms": ["lobby"], "publish": ["lobby"]}

    async def scenario() -> str:
        issued = (await ticket(nginx, mint("alice", **grants))).json()["ticket"]
        client = await streamed(nginx, ticket=issued)
        assert client.headers["content-type"] == "text/event-stream"
        socket = await welcomed(nginx, mint("bob", **grants))
        await client.join("lobby")
        await socket.join("lobby")
        # Each event must be through before the next is even published: a
        # buffering proxy would hold these small events until its buffer
        # filled or the stream ended, and the wait below would time out.
        for n in range(5):
            await socket.send({"type": "publish", "room": "lobby", "data": n})
            got = await client.next(lambda m: m["type"] == "message", timeout=3)
            assert got["data"] == n
        # The keepalive comments pass through too (what keeps proxies' idle
        # timers from cutting a quiet stream).
        await until(lambda: len(client.comments) >= 1, timeout=5)
        # Sends go through nginx as well.
        assert await client.ask({"type": "echo", "data": "via nginx"}) == {
            "type": "echo", "data": "via nginx"}
        return issued

    issued = run(scenario)
    nginx.stop()  # flushes the access log
    logged = nginx.access_log.read_text()
    assert issued not in logged and issued not in server.logs()
    assert '"GET /sse?[redacted] HTTP/1.1" 200' in logged, logged
    assert "open user=alice addr=127.0.0.1 via=ticket" in server.logs()


def test_site_streams_sse_unbuffered_and_longer_than_the_keepalive() -> None:
    site = "\n".join(
        line for line in NGINX_SITE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    block = site[site.index("location = /sse") :].split("}", 1)[0]
    for directive in (r"proxy_buffering\s+off;", r"proxy_cache\s+off;", r"gzip\s+off;",
                      r"proxy_http_version\s+1\.1;",
                      r"limit_req\s+zone=wsserver_handshake\s+burst=30\s+nodelay;"):
        assert re.search(r"^\s*" + directive, block, re.MULTILINE), directive
    timeout = re.search(r"^\s*proxy_read_timeout\s+(\d+)s;", block, re.MULTILINE)
    assert timeout is not None
    assert int(timeout.group(1)) > 2 * float(OPTIONS_BY_NAME["ping_interval"].default)
    assert re.search(r"location = /auth/ticket \{[^}]*limit_req ", site)
