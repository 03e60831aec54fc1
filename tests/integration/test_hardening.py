"""Abuse cases of issue 13 against the in-process server over real sockets.

Unverified connections in a pool of their own (item 1), demo tokens beside a
production key (2), input no reply can carry and tokens kept out of every log
(5), control characters in ``sub`` (7b), refusal floods (8), ``--jwt-typ``
and ``--max-token-lifetime`` (9), HTTP/1.0 upgrades (10), no ``Server``
header (11). Task pool fairness and cancellation are in test_task_messages.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import jwt
import pytest

from tests.support.clients import connect, welcomed
from tests.support.metrics import value
from tests.support.raw import RawConnection, raw_connect, upgrade_request
from tests.support.tokens import SECRET, bearer, mint
from wsserver.auth import DEMO_AUDIENCE, TokenVerifier
from wsserver.cli import main as cli_main
from wsserver.services import Services

#: The unverified pool, the refusal log and the answers themselves, over both
#: ways a plain-TCP upgrade is answered (see tests/integration/conftest.py).
BOTH_PATHS = pytest.mark.parametrize("handshake_path", ["native", "tornado"])

# --- 1: unverified connections cannot crowd out verified users --------------------------


@BOTH_PATHS
@pytest.mark.gen_test
@pytest.mark.parametrize(
    "server_flags", [{"max_connections": "2", "max_unverified_connections": "2"}]
)
async def test_garbage_tokens_do_not_crowd_out_verified_users(
    port: int, state: Services, handshake_path: str
) -> None:
    # Two upgrades with garbage tokens that never answer the 4001 close frame:
    # the server keeps them until its close handshake gives up.
    for _ in range(2):
        raw = await raw_connect(port, bearer("garbage"))
        assert raw.status == 101
    state.refresh_gauges()
    assert value(state.metrics.registry, "wsserver_connections_unverified") == 2
    third = await raw_connect(port, bearer("garbage"))
    assert third.status == 503 and third.headers["retry-after"]
    # Both verified users still get in: --max-connections is theirs.
    alice = await welcomed(port, mint("alice"))
    bob = await welcomed(port, mint("bob"))
    assert (state.registry.verified, state.registry.unverified) == (2, 2)
    assert value(state.metrics.registry, "wsserver_rejections_total",
                 reason="unverified_full") == 1
    await alice.close()
    await bob.close()


# --- 2: demo tokens beside a production key ---------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"demo": True, "jwt_audience": "prod-app",
                                           "jwt_issuer": "https://idp.example"}])
async def test_demo_tokens_beside_a_key_cannot_pass_as_production_tokens(
    port: int, http_client: Any, base_url: str, state: Services
) -> None:
    response = await http_client.fetch(base_url + "/auth/demo-token", method="POST",
                                       body=json.dumps({"user": "mallory"}))
    demo = json.loads(response.body)["token"]
    claims = jwt.decode(demo, options={"verify_signature": False})
    assert claims["aud"] == DEMO_AUDIENCE and claims["demo"] is True and "iss" not in claims
    conn = await welcomed(port, demo)  # this server, with --demo, takes it
    # Another service with the same key, its own audience and issuer does not.
    other = TokenVerifier(SECRET, ["HS256"], audience="prod-app", issuer="https://idp.example")
    with pytest.raises(Exception, match="invalid token"):
        other.verify(demo)
    await conn.close()


def test_demo_beside_a_key_off_loopback_is_a_config_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli_main(["check-config", "--jwt-secret", SECRET, "--demo", "--host", "0.0.0.0"])
    assert code == 2
    assert "--demo: refused with --host 0.0.0.0" in capsys.readouterr().err


def test_demo_beside_a_key_warns_loudly_at_start(run_server: Any) -> None:
    srv = run_server("--demo", env={"WSSERVER_JWT_SECRET": SECRET})
    srv.wait_for_log("WARNING wsserver.server: DEMO ENDPOINT ON BESIDE A CONFIGURED KEY")


# --- 5: input no reply can carry; tokens in no log --------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "text",
    ['{"type": "ping", "id": "\\ud800"}', '{"type": "ping", "id": 1e400}',
     '{"type": "echo", "id": 3, "data": ["\\udc00"]}'],
)
async def test_unencodable_input_is_bad_request_and_the_connection_stays(
    port: int, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    tok = mint("alice")
    conn = await connect(port, None, query=f"?token={tok}")
    assert (await conn.recv() or {})["type"] == "welcome"
    await conn.send(text)
    reply = await conn.recv()
    assert reply is not None, f"closed: {conn.close_code}"
    assert reply["code"] == "bad_request"
    assert reply.get("id") == (3 if '"id": 3' in text else None)
    assert (await conn.ask({"type": "ping"}))["type"] == "pong"
    assert tok not in caplog.text
    await conn.close()


class Exploding:
    """Stands in for a shared part so that a handler fails with an uncaught error."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("crafted failure")

    def __len__(self) -> int:
        raise RuntimeError("crafted failure")


def explode(*args: Any) -> None:
    raise RuntimeError("crafted failure")


@pytest.mark.gen_test
async def test_uncaught_errors_never_log_the_token(
    port: int, http_client: Any, base_url: str, state: Services,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    tok = mint("alice")
    # A plain handler: Tornado's RequestHandler.log_exception.
    state.hub = Exploding()  # type: ignore[assignment]
    response = await http_client.fetch(f"{base_url}/stats?token={tok}", raise_error=False)
    assert response.code == 500
    # The WebSocket handler, before the upgrade ...
    origins, state.origins = state.origins, Exploding()  # type: ignore[assignment]
    response = await http_client.fetch(
        f"{base_url}/ws?token={tok}", raise_error=False,
        headers={"Upgrade": "websocket", "Connection": "Upgrade",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"})
    assert response.code == 500
    state.origins = origins
    # ... and in open(), after it: the client gets the 101, then a 1011 close.
    state.registry.authenticate = explode  # type: ignore[method-assign]
    conn = await connect(port, None, query=f"?token={tok}")
    assert await conn.recv() is None
    assert conn.close_code == 1011
    uncaught = [r for r in caplog.records if "Uncaught exception" in r.getMessage()]
    assert len(uncaught) == 3, [r.getMessage() for r in caplog.records]
    assert all("token=[redacted]" in r.getMessage() for r in uncaught)
    assert tok not in caplog.text


# --- 7b: control characters in sub ------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("sub", ["alice\nINFO wsserver.connection: open user=root", "a\x1b[2K"])
async def test_a_sub_with_control_characters_closes_4001(
    port: int, sub: str, state: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    conn = await connect(port, mint(sub))
    assert await conn.recv() is None
    assert (conn.close_code, conn.close_reason) == (4001, "invalid token")
    assert all("\n" not in r.getMessage() and "\x1b" not in r.getMessage()
               for r in caplog.records)
    assert state.registry.authenticated == 0


# --- 8: refusal floods ---------------------------------------------------------------------


@BOTH_PATHS
@pytest.mark.gen_test
async def test_pipelined_refused_handshakes_get_one_answer(
    port: int, handshake_path: str
) -> None:
    raw = await RawConnection.open(port, upgrade_request() * 200)  # no token: 403 each
    answer = await raw.wait_eof()  # the server closes after the first refusal
    assert answer.count(b"HTTP/1.1 403") == 1
    assert b"\r\nConnection: close\r\n" in answer


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"handshake_rate": "1000", "handshake_burst": "1000"}])
async def test_refusal_logging_is_throttled_and_every_refusal_counted(
    port: int, state: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(40):
        raw = await raw_connect(port)
        assert raw.status == 403
        await raw.wait_eof()
    refused = [r for r in caplog.records if "handshake refused" in r.getMessage()]
    assert len(refused) == state.refusal_log.burst == 10
    assert not [r for r in caplog.records if r.name == "wsserver.access"]
    assert value(state.metrics.registry, "wsserver_rejections_total", reason="no_token") == 40


# --- 9: --jwt-typ and --max-token-lifetime ------------------------------------------------


def typed(sub: str = "alice", *, lifetime: int = 600, typ: str = "at+jwt") -> str:
    now = int(time.time())
    return mint(sub, iat=now, exp=now + lifetime, headers={"typ": typ})


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"jwt_typ": "at+jwt", "max_token_lifetime": "3600"}])
@pytest.mark.parametrize(
    ("make", "accepted"),
    [
        (lambda: typed(), True),
        (lambda: typed(typ="JWT"), False),
        (lambda: typed(lifetime=10 * 365 * 86400), False),
        (lambda: mint("alice"), False),  # no iat, typ JWT
    ],
)
async def test_typ_and_lifetime_at_connect(port: int, make: Any, accepted: bool) -> None:
    conn = await connect(port, make())
    first = await conn.recv()
    if accepted:
        assert first is not None and first["type"] == "welcome"
    else:
        assert first is None and conn.close_code == 4001
    await conn.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"jwt_typ": "at+jwt", "max_token_lifetime": "3600"}])
async def test_a_ten_year_token_is_refused_on_refresh(port: int) -> None:
    conn = await welcomed(port, typed())
    assert (await conn.ask({"type": "refresh", "token": typed()}))["type"] == "refreshed"
    await conn.send({"type": "refresh", "token": typed(lifetime=10 * 365 * 86400)})
    assert await conn.recv() is None
    assert (conn.close_code, conn.close_reason) == (4001, "invalid token: lifetime too long")


# --- 10: HTTP/1.0 upgrades ------------------------------------------------------------------


@pytest.mark.gen_test
async def test_an_http10_upgrade_is_400(port: int) -> None:
    raw = await RawConnection.open(port, upgrade_request(bearer(mint()), version="HTTP/1.0"))
    status, _ = await raw.read_head()
    assert status == 400
    body = json.loads((await raw.wait_eof()).decode())
    assert body["error"] == "bad_handshake"


# --- 11: no version in a Server header --------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/healthz", "/", "/static/wsclient.js", "/nope", "/ws"])
async def test_no_server_header(http_server: Any, http_client: Any, base_url: str,
                                path: str) -> None:
    response = await http_client.fetch(base_url + path, raise_error=False)
    assert response.code in (200, 400, 404)
    assert "Server" not in response.headers


@BOTH_PATHS
@pytest.mark.gen_test
async def test_no_server_header_on_the_upgrade(port: int, handshake_path: str) -> None:
    raw = await raw_connect(port, bearer(mint()))
    assert raw.status == 101 and "server" not in raw.headers


@BOTH_PATHS
@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"handshake_rate": "1000", "handshake_burst": "1000"}])
async def test_closes_of_bad_tokens_are_logged_through_the_same_throttle(
    port: int, state: Services, caplog: pytest.LogCaptureFixture, handshake_path: str
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(30):
        conn = await connect(port, "not.a.jwt")
        assert await conn.recv() is None and conn.close_code == 4001
    closes = [r.getMessage() for r in caplog.records if "code=4001" in r.getMessage()]
    assert len(closes) == state.refusal_log.burst, closes
    # The operator learns why; the client only got "invalid token".
    assert "detail='DecodeError'" in closes[0]
    # The server may finish its last close just after the client saw it.
    for _ in range(500):
        if state.registry.total == 0:
            break
        await asyncio.sleep(0.01)
    assert value(state.metrics.registry, "wsserver_closes_total", code="4001") == 30
