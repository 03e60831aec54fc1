"""The demo page and its client library, in real headless Chromium against the real server."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, Route, expect

from tests.support.http import fetch
from tests.support.metrics import value as metric
from tests.support.servers import free_port
from tests.support.tokens import KEYED_ENV, mint

pytestmark = pytest.mark.e2e

#: The demo page is served at the root.
PAGE = "/"

# Network errors Chromium itself logs while a server is down; page code logs none.
DOWNTIME_ERRORS = (
    r"^WebSocket connection to 'ws://127\.0\.0\.1:\d+/ws' failed",
    r"^Failed to load resource: net::ERR_CONNECTION_REFUSED$",
)


def connected(page: Page) -> str:
    """Waits for the page's welcome and returns the user it connected as."""
    expect(page.locator("#conn-state")).to_have_text("connected")
    expect(page.locator("#conn-user")).to_have_text(re.compile(r"^guest-\w+$"))
    return page.locator("#conn-user").inner_text()


def say(page: Page, text: str) -> None:
    """Types a chat message and sends it with the keyboard."""
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def run_task(page: Page, name: str, **args: str) -> None:
    """Picks a task, fills its fields by label, and presses Run."""
    page.get_by_label("Task", exact=True).select_option(name)
    for label, value in args.items():
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("button", name="Run", exact=True).click()


def test_page_connects_by_itself(run_server: Any, pages: Any) -> None:
    """With nothing typed: a demo token, a welcome, the token countdown and live stats."""
    srv = run_server("--port", "0")
    page = pages.open(srv.url + PAGE)
    connected(page)
    expect(page.locator("#conn-count")).to_have_text("1")
    expect(page.locator("#conn-expiry")).to_have_text(re.compile(r"^1[45]:\d\d$"))  # 900 s TTL
    expect(page.locator("#stat-connections")).to_have_text("1")
    expect(page.locator("#stat-users")).to_have_text("1")
    chart_line = page.locator("#stats-chart polyline.conn")
    expect(chart_line).to_have_attribute("points", re.compile(r"\d"))

    # A name of one's choosing: a new token and a new connection, watched from the start.
    socket_urls: list[str] = []
    page.on("websocket", lambda ws: socket_urls.append(ws.url))
    page.get_by_label("Name", exact=True).fill("carol")
    page.get_by_role("button", name="Connect", exact=True).click()
    expect(page.locator("#conn-user")).to_have_text("carol")
    expect(page.locator("#conn-count")).to_have_text("2")
    assert socket_urls == [srv.ws_url], "the token must travel in the subprotocol, not the URL"
    assert pages.errors == []


def test_two_pages_chat(run_server: Any, pages: Any) -> None:
    """Two users in the lobby see each other's messages with the sender's name."""
    srv = run_server("--port", "0")
    alice_page = pages.open(srv.url + PAGE, "a")
    bob_page = pages.open(srv.url + PAGE, "b")
    alice = connected(alice_page)
    bob = connected(bob_page)
    assert alice != bob

    say(bob_page, "hello from bob")
    expect(alice_page.locator("#chat-log li").last).to_have_text(f"#lobby {bob}: hello from bob")
    mine = bob_page.locator("#chat-log li").last
    expect(mine).to_have_text(f"#lobby {bob}: hello from bob")
    expect(mine).to_have_class("mine")

    say(alice_page, "hi bob <b>not bold</b>")
    expect(bob_page.locator("#chat-log li").last).to_have_text(
        f"#lobby {alice}: hi bob <b>not bold</b>"  # shown as text, never parsed as HTML
    )
    assert bob_page.locator("#chat-log b").count() == 0

    # A room only one of them joined.
    bob_page.get_by_label("Room", exact=True).fill("side")
    bob_page.get_by_label("Room", exact=True).press("Enter")
    expect(bob_page.locator("#room-list")).to_contain_text("side")
    bob_page.get_by_label("To", exact=True).select_option("side")
    say(bob_page, "only in side")
    expect(bob_page.locator("#chat-log li").last).to_have_text(f"#side {bob}: only in side")
    expect(alice_page.locator("#chat-log")).not_to_contain_text("only in side")
    assert pages.errors == []


def test_task_result_while_chat_stays_live(run_server: Any, pages: Any) -> None:
    """A long task runs in the pool while chat messages keep arriving; results are correct."""
    srv = run_server("--port", "0")
    worker = pages.open(srv.url + PAGE, "worker")
    friend = pages.open(srv.url + PAGE, "friend")
    connected(worker)
    friend_name = connected(friend)

    # The page's preset: about 2-3 s of hashing on this machine, long enough to chat meanwhile.
    worker.get_by_role("button", name=re.compile("^Run a slow task")).click()
    long_task = worker.locator("#task-list li").first
    expect(long_task).to_have_attribute("data-status", "running")
    expect(long_task).to_contain_text("sha256(data=slow, rounds=10000000)")

    say(friend, "still there?")
    expect(worker.locator("#chat-log li").last).to_have_text(f"#lobby {friend_name}: still there?")
    # "Tasks running" (from /stats) moves while it runs.
    expect(friend.locator("#stat-tasks")).to_have_text("1")
    assert long_task.get_attribute("data-status") == "running", "chat waited for the task"

    expect(long_task).to_have_attribute("data-status", "done", timeout=30_000)
    expect(long_task).to_contain_text(re.compile(r"= [0-9a-f]{64} in \d+ ms"))

    run_task(worker, "sha256", Data="hello", Rounds="3")
    digest = b"hello"
    for _ in range(3):
        digest = hashlib.sha256(digest).digest()
    expect(worker.locator("#task-list li").last).to_contain_text(f"= {digest.hex()} in ")

    run_task(worker, "primes", Limit="100")
    expect(worker.locator("#task-list li").last).to_contain_text(re.compile(r"= 25 in \d+ ms"))
    assert pages.errors == []


def test_errors_are_shown_where_the_user_acted(run_server: Any, pages: Any) -> None:
    """bad_request and busy under the task runner, rate_limited (with its wait) under the chat."""
    # A slow refill (one message per 2 s): the flood below is refused however slowly a
    # loaded machine lets the page type it, and the wait stays shorter than the notice.
    srv = run_server(
        "--port", "0", "--message-rate", "0.5", "--message-burst", "5",
        "--task-per-connection", "1",
    )
    page = pages.open(srv.url + PAGE)
    connected(page)

    # A server error is shown once, in the task's own row.
    run_task(page, "primes", Limit="-1")
    expect(page.locator("#task-list li").last).to_have_attribute("data-status", "error")
    expect(page.locator("#task-list li").last).to_contain_text("failed: bad_request")
    expect(page.locator("#task-error")).to_be_empty()
    expect(page.locator("#chat-error")).to_be_empty()

    # Not a whole number: refused by the page before anything is sent.
    run_task(page, "primes", Limit="1.5")
    expect(page.locator("#task-error")).to_have_text("Limit must be a whole number")
    expect(page.locator("#task-list li")).to_have_count(1)

    run_task(page, "sha256", Data="slow", Rounds="10000000")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#task-list li").nth(2)).to_contain_text("failed: busy")
    expect(page.locator("#task-list li").nth(1)).to_have_attribute("data-status", "running")
    expect(page.locator("#task-error")).to_be_empty()

    # The join at start and the tasks used most of the burst; these go over it (and stay
    # under the strikes that would close the connection with 4029).
    for n in range(8):
        say(page, f"flood {n}")
    notice = page.locator("#chat-notice")
    expect(notice).to_contain_text(re.compile(r"Rate limited: you can send again in \d+\.\d s"))
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_disabled()
    # Each refused message is marked in the chat.
    unsent = page.locator("#chat-log li.unsent")
    expect(unsent.first).to_have_text(re.compile(r'^Not sent to #lobby \(rate_limited\): "flood \d"$'))
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled(timeout=10_000)
    # The notice outlives a short wait, so it can be read, then goes.
    expect(notice).to_contain_text("Rate limited")
    expect(notice).to_be_empty(timeout=10_000)
    expect(page.locator("#conn-state")).to_have_text("connected")
    assert pages.errors == []


def test_close_codes_are_shown_in_the_connection_panel(run_server: Any, pages: Any) -> None:
    """4008 (a second tab as the same user at a cap of 1) and 4029 (flooding) are shown
    with their code and meaning, as the last close."""
    srv = run_server("--port", "0", "--max-connections-per-user", "1", "--message-rate", "1",
                     "--message-burst", "3", "--rate-limit-strikes", "2")
    first = pages.open(srv.url + PAGE, "first")
    second = pages.open(srv.url + PAGE, "second")
    connected(first)
    connected(second)
    for page in (first, second):
        page.get_by_label("Name", exact=True).fill("sam")
    first.get_by_role("button", name="Connect", exact=True).click()
    expect(first.locator("#conn-user")).to_have_text("sam")
    second.get_by_role("button", name="Connect", exact=True).click()
    expect(second.locator("#conn-close")).to_have_text(
        "Last close: 4008 too many connections for this user")
    expect(second.locator("#conn-state")).to_have_text("reconnecting…")

    # The page itself holds Send while rate limited; a script on it does not.
    first.evaluate("for (let n = 0; n < 12; n += 1) window.wsDemo.client.publish('lobby', 'x')")
    expect(first.locator("#conn-close")).to_have_text(
        re.compile(r"^Last close: 4029 "), timeout=10_000)
    assert pages.errors_except(r"status of 4008", r"WebSocket") == []


def test_a_blank_name_is_refused(run_server: Any, pages: Any) -> None:
    srv = run_server("--port", "0")
    page = pages.open(srv.url + PAGE)
    user = connected(page)
    page.get_by_label("Name", exact=True).fill("   ")
    page.get_by_role("button", name="Connect", exact=True).click()
    expect(page.locator("#conn-error")).to_have_text(
        "Type a name first: a blank name cannot connect.")
    expect(page.locator("#conn-user")).to_have_text(user)
    expect(page.locator("#conn-count")).to_have_text("1")
    # Client failures read as words, not as the library's text.
    page.get_by_role("button", name="Disconnect", exact=True).click()
    expect(page.locator("#conn-state")).to_have_text("disconnected")
    say(page, "anyone?")
    expect(page.locator("#chat-error")).to_have_text(
        "Not sent: not connected: press Connect (or paste a token) first")
    assert "connect()" not in page.locator("body").inner_text()
    assert pages.errors == []


def test_the_personal_room_and_the_intro(run_server: Any, pages: Any) -> None:
    """The page says what it shows; "My room" joins user:<name>."""
    srv = run_server("--port", "0")
    page = pages.open(srv.url + PAGE)
    user = connected(page)
    expect(page.locator(".intro")).to_contain_text("second tab")
    expect(page.locator("#personal-name")).to_have_text(f"user:{user}")
    page.get_by_role("button", name="My room", exact=True).click()
    expect(page.locator("#room-list")).to_contain_text(f"user:{user}")
    expect(page.locator("#chat-error")).to_be_empty()
    assert pages.errors == []


def test_desktop_layout_is_two_balanced_columns(run_server: Any, pages: Any) -> None:
    srv = run_server("--port", "0")
    page = pages.open(srv.url + PAGE, viewport={"width": 1280, "height": 900})
    connected(page)
    lefts = page.evaluate(
        "[...document.querySelectorAll('main > .panel')].map((p) => "
        "Math.round(p.getBoundingClientRect().left))"
    )
    assert len(lefts) == 4 and len(set(lefts)) == 2, lefts
    assert sorted(lefts).count(min(lefts)) == 2, lefts
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 1280
    assert pages.errors == []


def test_stops_and_says_why_on_a_final_close_code(run_server: Any, pages: Any) -> None:
    """A message over --max-message-size closes with 1009: the page stops, shows why,
    and does not reconnect (retrying would only repeat it)."""
    srv = run_server("--port", "0", "--max-message-size", "1000")
    page = pages.open(srv.url + PAGE)
    connected(page)
    say(page, "x" * 1500)
    expect(page.locator("#conn-state")).to_have_text("disconnected")
    expect(page.locator("#conn-detail")).to_have_text("Stopped: message too big.")
    expect(page.locator("#conn-close")).to_have_text("Last close: 1009 message too big")
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "stopped")
    assert metric(srv, "wsserver_connections_accepted_total") == 1.0
    assert pages.errors == []


@pytest.mark.slow
def test_stays_connected_across_token_expiries(run_server: Any, pages: Any) -> None:
    """6 s tokens, warned 3 s ahead: in-band refreshes keep one connection, no storm."""
    srv = run_server(
        "--port", "0", "--demo-token-ttl", "6", "--token-warning", "3", "--jwt-leeway", "0"
    )
    page = pages.open(srv.url + PAGE)
    user = connected(page)
    expect(page.locator("#conn-expiry")).to_have_text(re.compile(r"^0:0[0-6]$"))

    # Three refreshes span at least two whole token lifetimes.
    expect(page.locator("#conn-refreshes")).to_have_text(
        re.compile(r"^([3-9]|\d\d+)$"), timeout=30_000
    )
    expect(page.locator("#conn-state")).to_have_text("connected")
    expect(page.locator("#conn-count")).to_have_text("1")
    assert metric(srv, "wsserver_connections_accepted_total") == 1.0
    assert srv.get_json("/stats")["connections"] == 1

    say(page, "after refreshes")
    expect(page.locator("#chat-log li").last).to_have_text(f"#lobby {user}: after refreshes")
    assert pages.errors == []


@pytest.mark.slow
def test_comes_back_after_a_server_restart(run_server: Any, pages: Any) -> None:
    """Stop the server, start a new one on the same port: the page reconnects by itself,
    gets a new token (the new server's secret differs: close 4001), re-joins its room and
    sends what was queued meanwhile."""
    first = run_server("--port", "0")
    page = pages.open(srv_url := first.url + PAGE)
    user = connected(page)

    assert first.stop() == 0
    expect(page.locator("#conn-state")).not_to_have_text("connected")
    say(page, "sent while down")
    expect(page.locator("#chat-log li").last).to_have_text(
        'Queued for lobby: "sent while down" (sent on reconnect)'
    )

    second = run_server("--port", str(first.port))
    assert second.url + PAGE == srv_url
    expect(page.locator("#conn-state")).to_have_text("connected", timeout=30_000)
    expect(page.locator("#conn-count")).to_have_text("2")
    # Publishing needs room membership: the message arriving proves the re-join.
    expect(page.locator("#chat-log li").last).to_have_text(f"#lobby {user}: sent while down")
    assert metric(second, "wsserver_closes_total", code="4001") == 1.0
    assert pages.errors_except(*DOWNTIME_ERRORS) == []


@pytest.mark.slow
def test_a_message_sent_as_the_server_died_is_sent_again_with_its_key(
    run_server: Any, pages: Any
) -> None:
    """The server is stopped (SIGSTOP), a message is sent (it waits unread in the
    kernel), then the server is killed: the connection drops with nothing
    confirmed. Back on a new server, the page sends the same publish again, key
    included, and the message appears once, not marked "Not sent"."""
    first = run_server("--port", "0")
    page = pages.open(first.url + PAGE)
    sent: list[dict[str, Any]] = []

    def record(ws: Any) -> None:
        ws.on("framesent", lambda payload: sent.append(json.loads(payload)))

    page.on("websocket", record)
    user = connected(page)
    in_room(page, "lobby")
    say(page, "before")
    expect(page.locator("#chat-log li").last).to_have_text(f"#lobby {user}: before")

    first.proc.send_signal(signal.SIGSTOP)
    say(page, "in flight")
    deadline = time.monotonic() + 10
    while not any(m.get("data") == "in flight" for m in sent):
        assert time.monotonic() < deadline, "the page never sent the message"
        page.evaluate("0")  # turns for Playwright's dispatcher
    first.proc.kill()
    assert first.stop() == -signal.SIGKILL
    expect(page.locator("#conn-state")).not_to_have_text("connected")

    second = run_server("--port", str(first.port))
    expect(page.locator("#conn-count")).to_have_text("2", timeout=30_000)
    user = page.locator("#conn-user").inner_text()
    expect(page.locator("#chat-log li").last).to_have_text(f"#lobby {user}: in flight")
    first_try, again = [m for m in sent if m.get("data") == "in flight"]
    assert again == first_try and again["idempotency_key"], sent
    assert metric(second, "wsserver_messages_total", type="publish") == 1
    assert chat_texts(page) == ["before", "in flight"]
    expect(page.locator("#chat-log li.unsent")).to_have_count(0)
    assert pages.errors_except(*DOWNTIME_ERRORS) == []


def test_narrow_viewport_labels_keyboard_and_contrast(run_server: Any, pages: Any) -> None:
    """At 375 px: no sideways scrolling, every control labelled, usable by keyboard,
    text contrast at least 4.5:1."""
    srv = run_server("--port", "0")
    page = pages.open(srv.url + PAGE, viewport={"width": 375, "height": 740})
    user = connected(page)

    assert page.evaluate("document.scrollingElement.scrollWidth") <= 375
    unlabelled = page.evaluate(
        """[...document.querySelectorAll('input, select, textarea')]
             .filter((el) => !el.closest('[hidden]') && el.labels.length === 0
                     && !el.getAttribute('aria-label'))
             .map((el) => el.id)"""
    )
    assert unlabelled == []

    # Keyboard only: focus the message box, type, Enter.
    page.get_by_label("Message", exact=True).focus()
    page.keyboard.type("typed on a phone")
    page.keyboard.press("Enter")
    expect(page.locator("#chat-log li").last).to_have_text(f"#lobby {user}: typed on a phone")
    # Tab moves from the message box to the Send button.
    page.get_by_label("Message", exact=True).focus()
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_focused()

    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        ratios = page.evaluate(CONTRAST_SCRIPT)
        low = {selector: ratio for selector, ratio in ratios.items() if ratio < 4.5}
        assert low == {}, f"{scheme}: contrast below 4.5:1: {low}"
    assert pages.errors == []


def test_client_library_bounds_its_queue(run_server: Any, pages: Any) -> None:
    """wsclient.js in the browser: messages queue while not connected, up to the bound."""
    srv = run_server("--port", "0")
    page = pages.open(srv.url + PAGE)
    connected(page)
    outcome = page.evaluate(
        """async () => {
             const { WsClient } = await import('/static/wsclient.js');
             const client = new WsClient({ url: 'ws://127.0.0.1:9/ws', maxQueue: 2,
                                           getToken: () => new Promise(() => {}) });
             client.connect();
             const ids = [client.send({ type: 'ping' }), client.send({ type: 'ping' })];
             let refused = null;
             try { client.send({ type: 'ping' }); } catch (err) { refused = err.code; }
             const queued = client.queue.length;
             client.close();
             return { ids, refused, queued, state: client.state };
           }"""
    )
    assert outcome == {
        "ids": ["c1", "c2"],
        "refused": "queue_full",
        "queued": 2,
        "state": "stopped",
    }
    assert pages.errors == []


# WCAG relative luminance contrast of a few text elements against their backdrop.
CONTRAST_SCRIPT = """() => {
  const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => {
    const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const backdrop = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || c[3] > 0) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const out = {};
  for (const sel of ['h1', '.subtitle', '#conn-state', '.facts dt', '.facts dd', '.hint',
                     '#chat-log li', '.log .room', 'button[type=submit]', 'label', 'footer']) {
    const el = document.querySelector(sel);
    if (!el) { out[sel] = 0; continue; }
    const a = lum(rgb(getComputedStyle(el).color).slice(0, 3)), b = lum(backdrop(el));
    out[sel] = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  }
  return out;
}"""


def test_asks_for_a_token_when_not_in_demo_mode(run_server: Any, pages: Any) -> None:
    """Without the demo endpoint the page asks for a token (no name form, no 404 in the
    console), says when a pasted token is refused (4001), and connects with a good one."""
    port = free_port()  # the origin to allow must name the port up front
    origin = f"http://127.0.0.1:{port}"
    srv = run_server("--port", str(port), "--allowed-origins", origin, env=KEYED_ENV)
    page = pages.open(srv.url + PAGE)
    expect(page.locator("#conn-detail")).to_have_text("Waiting for a token: paste one below.")
    expect(page.locator("#conn-state")).to_have_text("waiting for a token")
    expect(page.locator("#name-form")).to_be_hidden()

    wrong = mint("dave", ttl=300, key="x" * 40)  # signed with another key
    page.get_by_label("Token", exact=True).fill(wrong)
    page.get_by_label("Token", exact=True).press("Enter")
    expect(page.locator("#conn-close")).to_have_text("Last close: 4001 invalid token")
    expect(page.locator("#conn-detail")).to_have_text(
        "The server refused the token (4001 invalid token): paste another.")

    # Rooms are deny by default in key mode: the token grants the lobby the page joins.
    token = mint("dave", ttl=300, rooms=["lobby"], publish=["lobby"])
    page.get_by_label("Token", exact=True).fill(token)
    page.get_by_label("Token", exact=True).press("Enter")
    expect(page.locator("#conn-state")).to_have_text("connected")
    expect(page.locator("#conn-user")).to_have_text("dave")
    expect(page.locator("#name-form")).to_be_hidden()
    say(page, "pasted in")
    expect(page.locator("#chat-log li").last).to_have_text("#lobby dave: pasted in")
    assert pages.errors == []


@pytest.mark.slow
def test_key_mode_states_follow_the_token(run_server: Any, pages: Any) -> None:
    """token_expiring asks for a new token while still connected; a pasted one refreshes
    in-band; without one the token expires (4001) and the page says so."""
    port = free_port()
    srv = run_server(
        "--port", str(port), "--allowed-origins", f"http://127.0.0.1:{port}",
        "--token-warning", "3", "--jwt-leeway", "0", env=KEYED_ENV,
    )
    page = pages.open(srv.url + PAGE)

    def paste(ttl: int) -> None:
        token = mint("erin", ttl=ttl)
        page.get_by_label("Token", exact=True).fill(token)
        page.get_by_label("Token", exact=True).press("Enter")

    paste(6)
    expect(page.locator("#conn-state")).to_have_text("connected")
    expect(page.locator("#conn-detail")).to_have_text(
        "Your token expires soon: paste a new one to stay connected.", timeout=10_000)
    expect(page.locator("#conn-state")).to_have_text("connected")
    paste(6)
    expect(page.locator("#conn-refreshes")).to_have_text("1")
    expect(page.locator("#conn-detail")).to_be_empty()
    # No paste this time: the token runs out.
    expect(page.locator("#conn-close")).to_have_text(
        "Last close: 4001 token expired", timeout=15_000)
    expect(page.locator("#conn-state")).to_have_text("waiting for a token")
    expect(page.locator("#conn-detail")).to_have_text(
        "The server refused the token (4001 token expired): paste another.")
    expect(page.locator("#conn-count")).to_have_text("1")
    assert pages.errors == []


# --- rooms, history and recovery (issues 10 and 12) ------------------------------------

#: The server API key the tests below give with --api-key-file (at least 32 bytes).
API_KEY = "page-tests-api-key-0123456789-abcdefghijklmnop"

#: The default namespace open to everyone, with history: the lobby recovers after a reconnect.
CHAT_WITH_HISTORY = """
[rooms]
join = "anyone"
publish = "members"
history_size = 100
"""


def server_files(tmp_path: Path, config: str) -> list[str]:
    """Writes ``config`` and the API key to files; the server arguments naming them."""
    config_file = tmp_path / "wsserver.toml"
    config_file.write_text(config)
    key_file = tmp_path / "api.key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    return ["--config", str(config_file), "--api-key-file", str(key_file)]


def api(srv: Any, path: str, body: Any) -> Any:
    """POST ``body`` to the server API with the key; the JSON answer."""
    answer = fetch(srv.url + path, body, headers={
        "Authorization": f"apikey {API_KEY}", "Content-Type": "application/json"})
    assert answer.status == 200, (answer.status, answer.body)
    return answer.json()


def in_room(page: Page, room: str) -> None:
    """Waits until the server confirmed the page's join of ``room``."""
    expect(page.locator("#room-list li[data-state=joined]", has_text=room)).to_have_count(1)


def chat_texts(page: Page) -> list[str]:
    """The text of every chat message on the page (not the notices), in order."""
    return page.locator("#chat-log li:not(.system):not(.notice):not(.unsent) .text").all_inner_texts()


def test_no_message_lost_across_a_reconnect(
    run_server: Any, pages: Any, tmp_path: Path
) -> None:
    """The server cuts the page's connection mid-chat (4001 through /api/disconnect, the
    token revoked); while the page waits for its new token the other page keeps talking;
    back, the page re-joins with "since" and shows every message once, in order."""
    srv = run_server(*server_files(tmp_path, CHAT_WITH_HISTORY))
    alice_page = pages.open(srv.url + PAGE, "alice")
    bob_page = pages.open(srv.url + PAGE, "bob")
    alice = connected(alice_page)
    connected(bob_page)
    in_room(alice_page, "lobby")
    in_room(bob_page, "lobby")

    before = [f"before {n}" for n in range(3)]
    for text in before:
        say(bob_page, text)
    expect(alice_page.locator("#chat-log li").last).to_contain_text(before[-1])

    # Hold the page's next token request: it stays away, deterministically, until released.
    held: list[Route] = []

    def hold_token(route: Route) -> None:
        if route.request.method == "POST":
            held.append(route)
        else:
            route.continue_()

    alice_page.route("**/auth/demo-token", hold_token)
    with alice_page.expect_request(lambda r: r.method == "POST" and "demo-token" in r.url):
        assert api(srv, "/api/disconnect",
                   {"user": alice, "code": 4001, "reason": "token revoked"}) == {}
    expect(alice_page.locator("#conn-close")).to_have_text("Last close: 4001 token revoked")
    expect(alice_page.locator("#conn-state")).to_have_text("connecting…")

    during = [f"while away {n}" for n in range(5)]
    for text in during:
        say(bob_page, text)
    # Each one is published (bob's own copy came back) before alice is back.
    expect(bob_page.locator("#chat-log li").last).to_contain_text(during[-1])
    assert alice_page.locator("#chat-log").inner_text().count("while away") == 0

    deadline = time.monotonic() + 10
    while not held:  # the handler runs on Playwright's dispatcher: give it turns
        assert time.monotonic() < deadline, "the token request never reached the route"
        alice_page.evaluate("0")
    held[0].continue_()
    alice_page.unroute("**/auth/demo-token")
    expect(alice_page.locator("#conn-count")).to_have_text("2")
    expect(alice_page.locator("#chat-log li.system").last).to_have_text(
        "Back in #lobby: 5 messages sent while you were away, recovered below.")
    in_room(alice_page, "lobby")
    say(bob_page, "after")
    expect(alice_page.locator("#chat-log li").last).to_contain_text("after")
    assert chat_texts(alice_page) == [*before, *during, "after"]
    assert chat_texts(bob_page) == [*before, *during, "after"]
    expect(alice_page.locator("#chat-log li.notice")).to_have_count(0)
    assert metric(srv, "wsserver_closes_total", code="4001") == 1.0
    assert pages.errors == []


@pytest.mark.slow
def test_a_restart_without_history_says_so_and_keeps_working(
    run_server: Any, pages: Any, tmp_path: Path
) -> None:
    """The memory broker's history dies with its process: after a restart the re-join
    cannot recover (new epoch), the page says so, and the chat goes on."""
    args = server_files(tmp_path, CHAT_WITH_HISTORY)
    first = run_server(*args)
    page = pages.open(first.url + PAGE)
    user = connected(page)
    in_room(page, "lobby")
    say(page, "before the restart")
    expect(page.locator("#chat-log li").last).to_have_text(f"#lobby {user}: before the restart")

    assert first.stop() == 0
    expect(page.locator("#conn-state")).not_to_have_text("connected")
    run_server("--port", str(first.port), *args)
    expect(page.locator("#conn-count")).to_have_text("2", timeout=30_000)
    notice = page.locator("#chat-log li.notice")
    expect(notice).to_have_text(
        "Messages sent to #lobby while you were away could not be recovered: "
        "some may be missing.")
    in_room(page, "lobby")
    say(page, "after the restart")
    expect(page.locator("#chat-log li").last).to_have_text(f"#lobby {user}: after the restart")
    expect(notice).to_have_count(1)
    assert pages.errors_except(*DOWNTIME_ERRORS) == []


def test_forbidden_is_shown_where_the_user_acted(
    run_server: Any, pages: Any, tmp_path: Path
) -> None:
    """Default namespace join = "token" and demo tokens without grants: the lobby and a
    typed room are refused under the chat; a room one may join but not publish to marks
    the message "Not sent"; the connection stays open throughout."""
    config = """
[rooms]
join = "token"
publish = "token"

[rooms.namespaces.news]
join = "anyone"
publish = "token"
"""
    srv = run_server(*server_files(tmp_path, config))
    page = pages.open(srv.url + PAGE)
    connected(page)
    chat_error = page.locator("#chat-error")
    expect(chat_error).to_have_text(re.compile(r"^Could not join #lobby: forbidden: "))
    expect(page.locator("#room-list li")).to_have_count(0)

    page.get_by_label("Room", exact=True).fill("secret")
    page.get_by_label("Room", exact=True).press("Enter")
    expect(chat_error).to_have_text(re.compile(r"^Could not join #secret: forbidden: "))
    expect(page.locator("#room-list li")).to_have_count(0)

    page.get_by_label("Room", exact=True).fill("news:today")
    page.get_by_label("Room", exact=True).press("Enter")
    in_room(page, "news:today")
    expect(chat_error).to_be_empty()
    say(page, "breaking")
    expect(page.locator("#chat-log li.unsent")).to_have_text(
        'Not sent to #news:today (forbidden): "breaking"')
    expect(chat_error).to_have_text(re.compile(r"^Not sent to #news:today: forbidden: "))
    expect(page.locator("#conn-error")).to_be_empty()
    expect(page.locator("#conn-state")).to_have_text("connected")
    expect(page.locator("#conn-count")).to_have_text("1")
    assert pages.errors == []


def test_the_backend_publishes_to_the_users_room(
    run_server: Any, pages: Any, tmp_path: Path
) -> None:
    """One POST /api/publish to user:<sub> and that user's page shows it, from "server";
    nobody else's page does, and the page itself may not publish there."""
    config = CHAT_WITH_HISTORY + """
[rooms.namespaces.user]
join = "owner"
publish = "none"
"""
    srv = run_server(*server_files(tmp_path, config))
    page = pages.open(srv.url + PAGE, "owner")
    other = pages.open(srv.url + PAGE, "other")
    user = connected(page)
    connected(other)
    page.get_by_role("button", name="My room", exact=True).click()
    in_room(page, f"user:{user}")
    # Someone else's personal room is refused.
    other.get_by_label("Room", exact=True).fill(f"user:{user}")
    other.get_by_label("Room", exact=True).press("Enter")
    expect(other.locator("#chat-error")).to_have_text(
        re.compile(rf"^Could not join #user:{user}: forbidden: "))

    # No history in the user namespace: the answer carries no offset.
    assert api(srv, "/api/publish", {"room": f"user:{user}", "data": "your report is ready"}) == {}
    expect(page.locator("#chat-log li").last).to_have_text(
        f"#user:{user} server: your report is ready")
    expect(other.locator("#chat-log")).not_to_contain_text("your report is ready")

    page.get_by_label("To", exact=True).select_option(f"user:{user}")
    say(page, "me too")
    expect(page.locator("#chat-log li.unsent")).to_have_text(
        f'Not sent to #user:{user} (forbidden): "me too"')
    assert pages.errors == []


def test_the_chart_has_a_scale_on_each_side(run_server: Any, pages: Any) -> None:
    srv = run_server("--port", "0")
    page = pages.open(srv.url + PAGE)
    connected(page)
    expect(page.locator("#stat-connections")).to_have_text("1")
    # One connection: the left scale tops at 1; no messages yet: the right one at 1 too.
    expect(page.locator("#axis-conn [data-tick]")).to_have_text(["1", "0.5", "0"])
    expect(page.locator("#axis-rate [data-tick]")).to_have_text(["1", "0.5", "0"])
    # Twelve messages in a second or two: the rate's scale grows to a round number.
    for n in range(12):
        say(page, f"m{n}")
    expect(page.locator("#axis-rate [data-tick]").first).to_have_text(re.compile(r"^(2|5|10|20)$"))
    top = page.locator("#axis-conn").bounding_box()
    chart = page.locator("#stats-chart").bounding_box()
    assert top is not None and chart is not None
    assert abs(top["y"] - chart["y"]) < 2 and abs(top["height"] - chart["height"]) < 2
    assert pages.errors == []


def test_stats_on_the_internal_port_are_asked_for_once(run_server: Any, pages: Any) -> None:
    """With --internal-port the page says where the statistics went, and does not
    poll /stats into a 404 WARNING line every second."""
    srv = run_server("--port", "0", "--internal-port", "0")
    page = pages.open(srv.url + PAGE)
    connected(page)
    expect(page.locator("#stats-error")).to_contain_text("--internal-port")
    expect(page.locator("#stats .chart-box")).to_be_hidden()
    # The page polled every second before: three seconds would have shown three more.
    page.wait_for_timeout(3000)
    polls = [line for line in srv.logs().splitlines() if "GET /stats" in line]
    assert len(polls) == 1, polls
    expect(page.locator("#conn-state")).to_have_text("connected")
    # Chromium's own line for the one 404, and nothing from the page's code.
    assert [text for _, text in pages.errors] == [
        "Failed to load resource: the server responded with a status of 404 (Not Found)"]


#: What Chromium logs for each refused handshake; the page's own code logs nothing.
REFUSED_SOCKET = r"^WebSocket connection to 'ws://127\.0\.0\.1:\d+/ws' failed"
#: And for each refused stream ticket (POST /auth/ticket answered 403).
REFUSED_TICKET = r"^Failed to load resource: the server responded with a status of 403 \(Forbidden\)$"


def test_a_page_refused_for_its_origin_says_what_to_check_and_stops(
    run_server: Any, pages: Any
) -> None:
    """Key mode: the handshake is refused (403, which a page sees as 1006) by a server
    that is up. The page stops after a few tries and names the setting to check."""
    srv = run_server("--allowed-origins", "https://app.example.com", env=KEYED_ENV)
    page = pages.open(srv.url + PAGE)
    token = mint("dave", ttl=300, rooms=["lobby"])
    page.get_by_label("Token", exact=True).fill(token)
    page.get_by_label("Token", exact=True).press("Enter")
    expect(page.locator("#conn-state")).to_have_text("disconnected", timeout=30_000)
    advice = page.locator("#conn-error")
    expect(advice).to_contain_text("--allowed-origins")
    expect(advice).to_contain_text(srv.url)  # the page's own origin, to add
    expect(page.locator("#conn-detail")).to_contain_text("refused before opening, 5 times")
    refusals = srv.logs().count("handshake refused: origin not allowed")
    assert refusals == 5
    page.wait_for_timeout(2000)  # it retried within a second or two before; not now
    assert srv.logs().count("handshake refused: origin not allowed") == refusals
    # After two refused sockets the client tries HTTP streaming (the upgrade may
    # be what is lost on the way), whose ticket is refused for the origin too.
    assert pages.errors_except(REFUSED_SOCKET, REFUSED_TICKET) == []


def test_a_demo_page_refused_for_its_origin_stops_at_the_token(
    run_server: Any, pages: Any
) -> None:
    """Demo mode: the token request is refused for the origin first; the page stops there."""
    srv = run_server("--allowed-origins", "https://app.example.com")
    page = pages.open(srv.url + PAGE)
    expect(page.locator("#conn-state")).to_have_text("disconnected")
    expect(page.locator("#conn-error")).to_contain_text("--allowed-origins")
    expect(page.locator("#conn-detail")).to_contain_text("refused this page's origin")
    page.wait_for_timeout(2000)
    tries = [line for line in srv.logs().splitlines()
             if "wsserver.access" in line and "POST /auth/demo-token" in line]
    assert len(tries) == 1, tries
    assert pages.errors_except(r"status of 403 \(Forbidden\)$") == []
