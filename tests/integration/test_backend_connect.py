"""The connect proxy, against a real application backend (cookie sessions) on loopback.

Every test runs the in-process server with ``--proxy-connect-url`` pointing at
:class:`tests.support.backend.AppBackend`; the clients are real WebSocket
clients sending the cookie a browser would.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.backend import AppBackend
from tests.support.clients import ORIGIN, connect, refused, welcomed, welcomed_without_token
from tests.support.metrics import value
from tests.support.raw import RawConnection, upgrade_request
from tests.support.tokens import mint
from tests.support.waiting import until
from wsserver.backend import PROXY_KEY_HEADER
from wsserver.services import Services

PROXY_KEY = "k" * 40


#: Both ways a plain-TCP upgrade is answered (see tests/integration/conftest.py).
pytestmark = pytest.mark.parametrize("handshake_path", ["native", "tornado"])


@pytest.fixture
def extra_flags() -> dict[str, str]:
    """More server flags; parametrize this name."""
    return {}


@pytest.fixture
def server_flags(app_backend: AppBackend, tmp_path: Path,
                 extra_flags: dict[str, str]) -> dict[str, str]:
    key_file = tmp_path / "proxy.key"
    key_file.write_text(PROXY_KEY + "\n")
    return {**app_backend.proxy_flags("connect"), "proxy_key_file": str(key_file),
            "proxy_timeout": "0.5", **extra_flags}


def cookie(backend: AppBackend, user: str) -> dict[str, str]:
    return {"Cookie": backend.login(user), "Origin": ORIGIN}


@pytest.mark.gen_test
async def test_a_session_cookie_connects_as_the_backends_user(
    port: int, app_backend: AppBackend, state: Services
) -> None:
    headers = {**cookie(app_backend, "alice"), "X-Other": "not passed"}
    conn = await welcomed_without_token(port, "alice", headers=headers)
    assert conn.welcome is not None
    assert conn.user == "alice"
    assert abs(conn.welcome["expires_at"] - (time.time() + 600)) < 5
    assert await conn.ask({"type": "echo", "data": 1, "id": 1}) == {
        "type": "echo", "data": 1, "id": 1}
    (call,) = app_backend.calls_of("connect")
    assert call.body == {"transport": "websocket", "addr": "127.0.0.1", "origin": ORIGIN,
                         "headers": {"Cookie": headers["Cookie"]}}
    assert call.headers[PROXY_KEY_HEADER] == PROXY_KEY
    assert value(state.metrics.proxy_requests, kind="connect", outcome="ok") == 1
    assert value(state.metrics.registry, "wsserver_proxy_request_seconds_count",
                 kind="connect") == 1


@pytest.mark.gen_test
async def test_no_session_is_refused_403_with_the_backends_reason(
    port: int, app_backend: AppBackend, state: Services
) -> None:
    error = await refused(port, headers={"Cookie": "session=unknown"})
    assert error.status == 403
    assert error.json() == {"error": "backend_refused", "message": "not logged in",
                            "code": 4003}
    error = await refused(port)  # no cookie at all: the backend decides that too
    assert error.status == 403
    assert value(state.metrics.proxy_requests, kind="connect", outcome="refused") == 2
    assert state.registry.total == 0


@pytest.mark.gen_test
async def test_a_jwt_is_verified_as_today_without_asking_the_backend(
    port: int, app_backend: AppBackend
) -> None:
    conn = await welcomed(port, mint("bob"))
    assert conn.user == "bob"
    conn = await connect(port, mint("bob", key="another-secret-0123456789-abcdefghij"))
    assert await conn.recv() is None and conn.close_code == 4001
    assert app_backend.calls_of("connect") == []


@pytest.mark.gen_test
async def test_a_bearer_that_is_not_a_jwt_goes_to_the_backend(
    port: int, app_backend: AppBackend
) -> None:
    session = app_backend.login("carol").rsplit("=", 1)[1]
    conn = await welcomed_without_token(port, "carol",
                                        headers={"Authorization": f"Bearer {session}"})
    assert conn.user == "carol"
    (call,) = app_backend.calls_of("connect")
    assert call.body["headers"] == {"Authorization": f"Bearer {session}"}


@pytest.mark.gen_test
@pytest.mark.parametrize("fault", ["500", "garbage", "not_json", "hang"])
async def test_a_failing_backend_gives_503_with_retry_after_quickly(
    port: int, app_backend: AppBackend, state: Services, fault: str
) -> None:
    app_backend.fault("connect", fault)
    started = time.monotonic()
    error = await refused(port, headers=cookie(app_backend, "alice"))
    assert time.monotonic() - started < 2.0  # --proxy-timeout 0.5
    assert error.status == 503
    assert int(error.headers["Retry-After"]) >= 1
    assert error.json()["error"] == "backend_unavailable"
    outcome = {"500": "error", "garbage": "invalid", "not_json": "invalid",
               "hang": "timeout"}[fault]
    assert value(state.metrics.proxy_requests, kind="connect", outcome=outcome) == 1
    assert value(state.metrics.rejections, reason="backend_unavailable") == 1
    assert state.registry.total == 0
    app_backend.fault("connect", None)
    assert (await welcomed_without_token(port, "alice", headers=cookie(app_backend, "alice"))).user == "alice"


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "answer",
    [
        {"result": {"user": ""}},
        {"result": {"user": "a\nb"}},
        {"result": {"user": "a", "expires_at": "soon"}},
        {"result": {"user": "a", "rooms": "chat:*"}},
        {"disconnect": "no"},
        [],
    ],
    ids=["empty-user", "control-user", "bad-expiry", "bad-rooms", "bad-disconnect", "list"],
)
async def test_answers_outside_the_contract_are_503_not_a_guess(
    port: int, app_backend: AppBackend, state: Services, answer: Any
) -> None:
    app_backend.answers["connect"] = lambda body: answer
    error = await refused(port, headers=cookie(app_backend, "alice"))
    assert error.status == 503
    assert value(state.metrics.proxy_requests, kind="connect", outcome="invalid") == 1


@pytest.mark.gen_test
@pytest.mark.parametrize("extra_flags", [{"max_connections_per_ip": "1"}])
async def test_origin_and_caps_are_checked_before_the_backend_is_asked(
    port: int, app_backend: AppBackend
) -> None:
    error = await refused(port, headers={**cookie(app_backend, "a"), "Origin": "http://evil.example"})
    assert error.status == 403 and error.json()["error"] == "origin"
    assert app_backend.calls_of("connect") == []
    first = await welcomed_without_token(port, "a", headers=cookie(app_backend, "a"))
    error = await refused(port, headers=cookie(app_backend, "b"))
    assert error.status == 429 and error.json()["error"] == "address_cap"
    assert len(app_backend.calls_of("connect")) == 1
    await first.close()


@pytest.mark.gen_test
async def test_the_expiry_the_backend_gives_warns_then_closes_4001(
    port: int, app_backend: AppBackend
) -> None:
    app_backend.session_ttl = 2.0
    conn = await welcomed_without_token(port, "alice", headers=cookie(app_backend, "alice"))
    first = await conn.recv(timeout=5)
    assert first is not None and first["type"] == "token_expiring"
    assert await conn.recv(timeout=5) is None
    assert conn.close_code == 4001 and conn.close_reason == "token expired"


@pytest.mark.gen_test
async def test_a_session_without_expiry_never_expires(port: int, app_backend: AppBackend) -> None:
    app_backend.session_ttl = None
    conn = await welcomed_without_token(port, "alice", headers=cookie(app_backend, "alice"))
    assert conn.welcome is not None and conn.welcome["expires_at"] is None
    assert await conn.ask({"type": "ping"}) == {"type": "pong"}


@pytest.mark.gen_test
async def test_an_expiry_in_the_past_is_refused_403(port: int, app_backend: AppBackend) -> None:
    app_backend.session_ttl = -10
    error = await refused(port, headers=cookie(app_backend, "alice"))
    assert error.status == 403
    assert error.json()["code"] == 4001


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [{"join": "token", "publish": "token"}])
async def test_the_backends_grants_open_rooms(port: int, app_backend: AppBackend) -> None:
    app_backend.grants = {"rooms": ["chat:*"], "publish": ["chat:general"]}
    conn = await welcomed_without_token(port, "alice", headers=cookie(app_backend, "alice"))
    await conn.join("chat:general")
    reply = await conn.ask({"type": "publish", "room": "chat:general", "data": "hi"})
    assert reply["type"] == "message" and reply["from"] == "alice"
    reply = await conn.ask({"type": "join", "room": "other"})
    assert reply["code"] == "forbidden"


@pytest.mark.gen_test
@pytest.mark.parametrize("extra_flags", [{"proxy_max_concurrency": "2", "proxy_timeout": "5"}])
async def test_beyond_the_concurrency_bound_503_at_once_not_a_queue(
    port: int, app_backend: AppBackend, state: Services
) -> None:
    app_backend.fault("connect", "hang")
    waiting = [asyncio.ensure_future(refused(port, headers=cookie(app_backend, u)))
               for u in ("a", "b")]
    await until(lambda: app_backend.waiting.get("connect", 0) == 2)
    started = time.monotonic()
    error = await refused(port, headers=cookie(app_backend, "c"))
    assert time.monotonic() - started < 0.5
    assert error.status == 503
    assert value(state.metrics.proxy_requests, kind="connect", outcome="overloaded") == 1
    assert len(app_backend.calls_of("connect")) == 2  # the third never reached it
    # Meanwhile a JWT connection is served as usual.
    conn = await welcomed(port, mint("dave"))
    assert await conn.ask({"type": "ping"}) == {"type": "pong"}
    app_backend.release_hanging()  # the backend answers 500 now
    for future in waiting:
        assert (await future).status == 503
    assert state.registry.total == 1


@pytest.mark.gen_test
@pytest.mark.parametrize("extra_flags", [{"proxy_timeout": "5"}])
@pytest.mark.parametrize("answer", ["accepts", "fails"])
async def test_a_client_that_leaves_while_the_backend_decides_leaves_nothing_behind(
    port: int, app_backend: AppBackend, state: Services, answer: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # "accepts": the backend answers a second later with the user; "fails": it
    # hangs until released, then answers 500.
    app_backend.fault("connect", 1.0 if answer == "accepts" else "hang")
    conn = await RawConnection.open(port, upgrade_request(cookie(app_backend, "alice")))
    await until(lambda: app_backend.waiting.get("connect", 0) == 1)
    assert state.registry.count_for_address("127.0.0.1") == 1  # its slot is held meanwhile
    conn.drop()
    await asyncio.sleep(0.05)  # the server sees the FIN
    if answer == "fails":
        app_backend.release_hanging()
    await until(lambda: app_backend.waiting.get("connect", 0) == 0)
    await until(lambda: state.registry.count_for_address("127.0.0.1") == 0)
    assert state.registry.total == 0 and state.registry.authenticated == 0
    assert "Traceback" not in caplog.text and "Uncaught" not in caplog.text
    # And the next one is served.
    app_backend.fault("connect", None)
    alice = await welcomed_without_token(port, "alice", headers=cookie(app_backend, "alice"))
    assert await alice.ask({"type": "ping"}) == {"type": "pong"}
