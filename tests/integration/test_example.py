"""examples/flask_chat: the Flask app and wsserver, both real processes, and real clients
carrying the app's session cookie."""

from __future__ import annotations

import http.client
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.aio import run
from tests.support.clients import refused, welcomed_without_token
from tests.support.servers import ROOT, ServerFactory, clean_env, free_port, wait_for_port

EXAMPLE = ROOT / "examples" / "flask_chat"
ORIGIN = "http://localhost:5000"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    key = tmp_path / "proxy.key"
    key.write_text("example-proxy-key-" + "x" * 40)
    return key


@pytest.fixture
def flask_port(key_file: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE / "app.py"), "--port", str(port)], cwd=ROOT,
        env=clean_env({"WSSERVER_PROXY_KEY_FILE": str(key_file), "FLASK_SECRET_KEY": "s" * 32}),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def log_in(port: int, user: str) -> str:
    """POST the login form as a browser would; the session cookie it sets."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/login", body=f"user={user}",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        assert response.status == 303
        cookie = response.getheader("Set-Cookie")
        assert cookie is not None and cookie.startswith("session=")
        return cookie.split(";", 1)[0]
    finally:
        conn.close()


def test_the_flask_apps_chat_runs_on_wsserver_through_the_proxies(
    run_server: ServerFactory, flask_port: int, key_file: Path
) -> None:
    app = f"http://127.0.0.1:{flask_port}/wsserver"
    srv = run_server(
        "--config", str(EXAMPLE / "wsserver.toml"), "--port", "0",
        "--proxy-key-file", str(key_file),
        *(arg for kind in ("connect", "subscribe", "publish", "rpc")
          for arg in (f"--proxy-{kind}-url", f"{app}/{kind}")))
    alice_cookie, bob_cookie = log_in(flask_port, "alice"), log_in(flask_port, "bob")

    async def scenario() -> None:
        alice = await welcomed_without_token(
            srv, "alice", headers={"Cookie": alice_cookie}, origin=ORIGIN)
        bob = await welcomed_without_token(srv, "bob", headers={"Cookie": bob_cookie},
                                           origin=ORIGIN)
        await alice.join("chat:lobby")
        await bob.join("chat:lobby")
        mine = await alice.ask({"type": "publish", "room": "chat:lobby",
                                "data": {"text": "darn, hello"}, "id": 1})
        assert mine["data"]["text"] == "****, hello" and isinstance(mine["data"]["at"], int)
        theirs = await bob.recv()
        assert theirs is not None and theirs["from"] == "alice"
        assert theirs["data"]["text"] == "****, hello"
        reply = await bob.ask({"type": "publish", "room": "chat:lobby", "data": "no text"})
        assert reply["code"] == "bad_request"
        # Teams: the app's rule.
        assert (await alice.ask({"type": "join", "room": "team:red"}))["type"] == "joined"
        reply = await bob.ask({"type": "join", "room": "team:red"})
        assert reply == {"type": "error", "code": "forbidden",
                         "message": "you are not in that team"}
        # The personal room the connect proxy granted, and nobody else's.
        await alice.join("user:alice")
        assert (await alice.ask({"type": "join", "room": "user:bob"}))["code"] == "forbidden"
        assert await alice.ask({"type": "rpc", "method": "my_teams", "id": "t"}) == {
            "type": "rpc_result", "data": ["team:red"], "id": "t"}
        # No session cookie, or a forged one: 403 before the upgrade.
        for headers in ({}, {"Cookie": "session=forged.value.here"}):
            error = await refused(srv, headers=headers, origin=ORIGIN)
            assert error.status == 403
            assert error.json() == {"error": "backend_refused", "message": "log in first",
                                    "code": 4003}

    run(scenario)


def test_the_app_refuses_callers_without_the_proxy_key(flask_port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", flask_port, timeout=10)
    try:
        conn.request("POST", "/wsserver/connect", body=b'{"headers": {}}',
                     headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 403
    finally:
        conn.close()
