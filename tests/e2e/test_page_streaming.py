"""The demo page over HTTP streaming (issue 22): real Chromium, WebSockets taken away.

A page-level script runs before the page's own and makes ``WebSocket`` unusable,
as a proxy that strips the upgrade would: either the constructor throws, or
the socket fails without ever opening. ``wsclient.js`` must then fall back to
``EventSource`` and ``fetch`` against the real server, and the page must work
fully: chat with a WebSocket page, join/leave events, presence, tasks, the
server API, and recovery after the stream is cut.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, Response, Route, expect

from tests.e2e.test_page import api, chat_texts, connected, in_room, run_task, say, server_files
from tests.support.metrics import value as metric

pytestmark = pytest.mark.e2e

#: WebSocket throws, as in a browser (or an extension) that forbids it.
WEBSOCKET_THROWS = """
window.WebSocket = class { constructor() { throw new DOMException('blocked', 'SecurityError'); } };
"""
#: WebSocket never opens and closes with 1006, as when a proxy strips the upgrade.
WEBSOCKET_NEVER_OPENS = """
window.WebSocket = class {
  constructor() {
    this.readyState = 0;
    setTimeout(() => { this.readyState = 3; this.onclose && this.onclose({ code: 1006, reason: '' }); }, 50);
  }
  send() { throw new DOMException('not open', 'InvalidStateError'); }
  close() {}
};
"""

#: How the browser logs a request answered 503 (here: only while the server drains).
DRAINING = r"^Failed to load resource: the server responded with a status of 503 \(Service Unavailable\)$"

#: The lobby for everyone, with history, presence and join/leave events.
CHAT = """
[rooms]
join = "anyone"
publish = "members"
history_size = 100
presence = true
join_leave = true

[rooms.namespaces.user]
join = "owner"
publish = "none"
"""


def streaming(page: Page) -> None:
    """Waits until the page says it is connected over HTTP streaming."""
    expect(page.locator("#conn-state")).to_have_text("connected")
    expect(page.locator("#conn-transport")).to_have_text("HTTP streaming (SSE)")


def test_the_page_works_fully_over_streaming(
    run_server: Any, pages: Any, tmp_path: Path
) -> None:
    srv = run_server(*server_files(tmp_path, CHAT))
    blocked = pages.open(srv.url + "/", "blocked", init_script=WEBSOCKET_THROWS)
    other = pages.open(srv.url + "/", "websocket")
    alice = connected(blocked)
    streaming(blocked)
    bob = connected(other)
    expect(other.locator("#conn-transport")).to_have_text("WebSocket")
    in_room(blocked, "lobby")
    in_room(other, "lobby")
    expect(blocked.locator("#chat-log li.system").last).to_have_text(f"{bob} joined #lobby")

    # Chat both ways between the two transports.
    say(blocked, "hello over a stream")
    expect(other.locator("#chat-log li").last).to_have_text(f"#lobby {alice}: hello over a stream")
    say(other, "hello over a socket")
    expect(blocked.locator("#chat-log li").last).to_have_text(f"#lobby {bob}: hello over a socket")

    # Presence, through the page's client.
    users = blocked.evaluate("window.wsDemo.client.presence('lobby').then((r) => r.users)")
    assert sorted(users) == sorted([alice, bob])

    # Tasks: one in the pool while the chat goes on.
    run_task(blocked, "primes", Limit="100")
    expect(blocked.locator("#task-list li").last).to_contain_text(re.compile(r"= 25 in \d+ ms"))

    # The backend publishes to the user's own room.
    blocked.get_by_role("button", name="My room", exact=True).click()
    in_room(blocked, f"user:{alice}")
    api(srv, "/api/publish", {"room": f"user:{alice}", "data": "report ready"})
    expect(blocked.locator("#chat-log li").last).to_have_text(f"#user:{alice} server: report ready")

    # Leaving is seen by the others.
    other.get_by_role("button", name="Leave room lobby").click()
    expect(blocked.locator("#chat-log li.system").last).to_have_text(f"{bob} left #lobby")
    assert metric(srv, "wsserver_connections_by_transport", transport="sse") == 1
    assert metric(srv, "wsserver_connections_by_transport", transport="websocket") == 1
    assert pages.errors == []


def test_a_stripped_upgrade_falls_back_and_recovers_after_the_stream_is_cut(
    run_server: Any, pages: Any, tmp_path: Path
) -> None:
    """The WebSocket never opens; the page streams. The server cuts the stream (4001
    through /api/disconnect); while the page waits for a new token the other page
    keeps talking; back, the page re-joins with "since" and shows every message once."""
    srv = run_server(*server_files(tmp_path, CHAT))
    page = pages.open(srv.url + "/", "blocked", init_script=WEBSOCKET_NEVER_OPENS)
    other = pages.open(srv.url + "/", "websocket")
    alice = connected(page)
    streaming(page)
    connected(other)
    in_room(page, "lobby")
    in_room(other, "lobby")
    say(other, "before")
    expect(page.locator("#chat-log li").last).to_contain_text("before")

    held: list[Route] = []

    def hold_token(route: Route) -> None:
        if route.request.method == "POST":
            held.append(route)
        else:
            route.continue_()

    page.route("**/auth/demo-token", hold_token)
    with page.expect_request(lambda r: r.method == "POST" and "demo-token" in r.url):
        assert api(srv, "/api/disconnect",
                   {"user": alice, "code": 4001, "reason": "token revoked"}) == {}
    expect(page.locator("#conn-close")).to_have_text("Last close: 4001 token revoked")
    during = [f"while away {n}" for n in range(3)]
    for text in during:
        say(other, text)
    expect(other.locator("#chat-log li").last).to_contain_text(during[-1])
    assert "while away" not in page.locator("#chat-log").inner_text()

    deadline = time.monotonic() + 10
    while not held:
        assert time.monotonic() < deadline, "the token request never reached the route"
        page.evaluate("0")
    held[0].continue_()
    page.unroute("**/auth/demo-token")
    expect(page.locator("#conn-count")).to_have_text("2")
    streaming(page)  # still streaming: WebSocket is known blocked
    expect(page.locator("#chat-log li.system", has_text="Back in #lobby")).to_have_text(
        "Back in #lobby: 3 messages sent while you were away, recovered below.")
    say(other, "after")
    expect(page.locator("#chat-log li").last).to_contain_text("after")
    assert chat_texts(page) == ["before", *during, "after"]
    assert metric(srv, "wsserver_closes_total", code="4001") == 1.0
    assert pages.errors == []


def test_the_page_can_be_told_to_stream(run_server: Any, pages: Any) -> None:
    """?transport=sse: no WebSocket is even tried; a server shutdown's close event (1001)
    is shown as a WebSocket's would be."""
    srv = run_server("--port", "0")
    sockets: list[str] = []
    page = pages.open(srv.url + "/?transport=sse")
    page.on("websocket", lambda ws: sockets.append(ws.url))
    user = connected(page)
    streaming(page)
    say(page, "streamed")
    expect(page.locator("#chat-log li").last).to_have_text(f"#lobby {user}: streamed")
    assert sockets == []
    assert metric(srv, "wsserver_connections_accepted_by_transport_total", transport="sse") == 1
    # A reconnect may reach the server while it drains, on a connection the browser
    # kept alive: that is answered 503 with Retry-After, which the browser logs.
    unavailable: list[str | None] = []

    def answered(response: Response) -> None:
        if response.status == 503:
            unavailable.append(response.headers.get("retry-after"))

    page.on("response", answered)
    # The first close the client sees (the reconnects that follow fail: the server is gone).
    page.evaluate("""window.closes = [];
        window.wsDemo.client.addEventListener('state', ({ detail }) => {
          if (typeof detail.code === 'number') window.closes.push([detail.code, detail.reason]);
        })""")
    assert srv.stop() == 0
    page.wait_for_function("window.closes.length > 0")
    assert page.evaluate("window.closes[0]") == [1001, "server shutting down"]
    expect(page.locator("#conn-state")).not_to_have_text("connected")
    assert pages.errors_except(r"ERR_CONNECTION_REFUSED", r"net::ERR_", DRAINING) == []
    assert all(retry_after == "5" for retry_after in unavailable)
