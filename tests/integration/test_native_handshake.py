"""The native upgrade path against Tornado's: the same answers, and what it leaves to Tornado.

A plain-TCP ``GET /ws`` upgrade is answered at accept time
(``wsserver.edge.native``); everything else goes to Tornado's HTTP server
untouched. Tests that take ``handshake_path`` run over both ways (see
``tests/integration/conftest.py``) against one table of expected answers,
byte for byte but the ``Date``; on the native path they also check that
Tornado was never asked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from tests.support.clients import ORIGIN, welcomed
from tests.support.raw import RawConnection, raw_connect, text_frame, upgrade_request
from tests.support.tokens import bearer, mint
from tests.support.waiting import until
from wsserver.edge.listener import Listener
from wsserver.handshake import NO_TOKEN
from wsserver.services import Services

BOTH = pytest.mark.parametrize("handshake_path", ["native", "tornado"])


@pytest.fixture
def handed_to_tornado(http_server: Listener) -> Iterator[list[Any]]:
    """The addresses of the connections the listener gave to Tornado's HTTP server."""
    handed: list[Any] = []
    to_tornado = http_server.to_tornado

    def recording(connection: socket.socket, address: Any, spent: float) -> None:
        handed.append(address)
        to_tornado(connection, address, spent)

    http_server.to_tornado = recording  # type: ignore[method-assign]
    yield handed


async def answer_to(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """The whole answer to ``request`` (the server closes after it): the
    status line, the headers (names lower-cased) and the body."""
    conn = await RawConnection.open(port, request)
    data = await conn.wait_eof()
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def hold_one(**kw: Any) -> Callable[[int, Services], Awaitable[Any]]:
    """Setup: one welcomed connection (from ``kw``'s headers), held open."""
    async def setup(port: int, state: Services) -> Any:
        return await welcomed(port, mint("holder"), **kw)
    return setup


async def drain(port: int, state: Services) -> None:
    state.draining = True


#: (flags, setup, request headers, status line, headers besides Date, body).
REFUSALS: dict[str, tuple[dict[str, str], Any, dict[str, str], str, dict[str, str], Any]] = {
    "origin": (
        {}, None, {"Origin": "http://evil.example", **bearer(mint())},
        "HTTP/1.1 403 Forbidden", {},
        {"error": "origin", "message": "origin not allowed: 'http://evil.example'"},
    ),
    "handshake rate": (
        {"handshake_rate": "0.01", "handshake_burst": "1"}, hold_one(), bearer(mint()),
        "HTTP/1.1 429 Too Many Requests", {"retry-after": "100"},
        {"error": "handshake_rate", "message": "too many handshakes from this address"},
    ),
    "server full": (
        {"max_connections": "1"}, hold_one(), bearer(mint()),
        "HTTP/1.1 503 Service Unavailable", {"retry-after": "5"},
        {"error": "server_full", "message": "server at its connection limit"},
    ),
    "address cap": (
        {"max_connections_per_ip": "1"}, hold_one(), {"Origin": ORIGIN, **bearer(mint())},
        "HTTP/1.1 429 Too Many Requests", {},
        {"error": "address_cap", "message": "too many connections from 127.0.0.1"},
    ),
    "address cap behind a trusted proxy": (
        {"max_connections_per_ip": "1", "trusted_proxies": "127.0.0.1"},
        hold_one(headers={"X-Forwarded-For": "203.0.113.7"}),
        {"X-Forwarded-For": "198.51.100.1, 203.0.113.7", **bearer(mint())},
        "HTTP/1.1 429 Too Many Requests", {},
        {"error": "address_cap", "message": "too many connections from 203.0.113.7"},
    ),
    "no token": (
        {}, None, {"Origin": ORIGIN},
        "HTTP/1.1 403 Forbidden", {}, {"error": "no_token", "message": NO_TOKEN},
    ),
    "draining": (
        {}, drain, bearer(mint()),
        "HTTP/1.1 503 Service Unavailable", {"retry-after": "5"},
        {"error": "draining", "message": "server shutting down"},
    ),
}


def _refusal_params() -> list[Any]:
    return [pytest.param(name, flags, id=name) for name, (flags, *_) in REFUSALS.items()]


@BOTH
@pytest.mark.gen_test
@pytest.mark.parametrize(("case", "server_flags"), _refusal_params())
async def test_each_refusal_is_answered_alike_on_both_paths(
    port: int, state: Services, case: str, handshake_path: str, handed_to_tornado: list[Any]
) -> None:
    _, setup, headers, status, extra, body = REFUSALS[case]
    held = await setup(port, state) if setup is not None else None
    handed_before = len(handed_to_tornado)
    status_line, answer, content = await answer_to(port, upgrade_request(headers))
    assert status_line == status
    date = answer.pop("date")
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 5
    expected = {**extra, "content-type": "application/json", "cache-control": "no-store",
                "content-length": str(len(content)), "connection": "close"}
    assert answer == expected
    assert json.loads(content) == body
    # Byte for byte, as Tornado's json.dumps writes it.
    assert content == json.dumps(body).encode()
    if handshake_path == "native":
        assert len(handed_to_tornado) == handed_before  # answered without Tornado
    if held is not None:
        await held.close()


@BOTH
@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"handshake_rate": "1000", "handshake_burst": "1000"}])
async def test_refusals_are_counted_and_their_log_lines_throttled_on_both_paths(
    port: int, state: Services, handshake_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(15):
        await answer_to(port, upgrade_request())
    refused = [r for r in caplog.records if "handshake refused" in r.getMessage()]
    assert len(refused) == state.refusal_log.burst == 10
    assert refused[0].getMessage() == f"handshake refused: {NO_TOKEN} (403) addr=127.0.0.1"
    assert not [r for r in caplog.records if r.name == "wsserver.access"]


class _Failing:
    """Stands in for the origin check so that the handshake fails uncaught."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("crafted failure")


@BOTH
@pytest.mark.gen_test
async def test_an_uncaught_error_is_a_500_with_its_error_and_access_lines_on_both_paths(
    port: int, state: Services, handshake_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    state.origins = _Failing()  # type: ignore[assignment]
    tok = mint()
    conn = await RawConnection.open(port, upgrade_request({"Origin": ORIGIN}, path=f"/ws?token={tok}"))
    assert (await conn.read_head())[0] == 500
    conn.discard()
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records
             if r.name in ("tornado.application", "wsserver.access")]
    assert [line[:2] for line in lines] == [("tornado.application", "ERROR"),
                                            ("wsserver.access", "ERROR")]
    assert lines[0][2] == "Uncaught exception GET /ws?token=[redacted] (127.0.0.1)"
    assert lines[1][2].startswith("500 GET /ws?token=[redacted] (127.0.0.1) ")
    assert tok not in caplog.text


# --- what the native path leaves to Tornado -------------------------------------------


def _request(*lines: str, end: str = "\r\n") -> bytes:
    return (end.join(lines) + end + end).encode("latin-1")


def _upgrade_lines(token: str, *, path: str = "/ws", version: str = "HTTP/1.1",
                   key_version: str = "13") -> list[str]:
    return [f"GET {path} {version}", "Host: 127.0.0.1", "Upgrade: websocket",
            "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            f"Sec-WebSocket-Version: {key_version}", f"Authorization: Bearer {token}"]


#: A request the native path leaves alone, and Tornado's status for it.
ODD_HEADS: dict[str, tuple[Callable[[str], bytes], int]] = {
    "LF line ends": (lambda t: _request(*_upgrade_lines(t), end="\n"), 101),
    "a byte above 0x7F in a value": (
        lambda t: _request(*_upgrade_lines(t), "X-Note: caf\xe9"), 101),
    "an empty Content-Length": (lambda t: _request(*_upgrade_lines(t), "Content-Length: 0"), 101),
    "HTTP/1.0": (lambda t: _request(*_upgrade_lines(t, version="HTTP/1.0")), 400),
    "another path": (lambda t: _request(*_upgrade_lines(t, path="/ws/")), 404),
    "version 8": (lambda t: _request(*_upgrade_lines(t, key_version="8")), 426),
    "a folded header line": (lambda t: _request(*_upgrade_lines(t), " folded"), 400),
    "no Host": (lambda t: _request(*[line for line in _upgrade_lines(t)
                                     if not line.startswith("Host")]), 400),
    "a health probe": (lambda t: _request("GET /healthz HTTP/1.1", "Host: 127.0.0.1"), 200),
}


@pytest.mark.gen_test
@pytest.mark.parametrize("case", ODD_HEADS)
async def test_odd_heads_go_to_tornado_and_are_answered_as_before(
    port: int, case: str, handed_to_tornado: list[Any]
) -> None:
    build, status = ODD_HEADS[case]
    conn = await RawConnection.open(port, build(mint("odd")))
    assert (await conn.read_head())[0] == status
    if status == 101:
        assert (await conn.read_json())["type"] == "welcome"
    assert len(handed_to_tornado) == 1
    conn.discard()


@pytest.mark.gen_test
async def test_a_head_in_two_parts_goes_to_tornado_and_is_upgraded(
    port: int, handed_to_tornado: list[Any]
) -> None:
    request = upgrade_request(bearer(mint("slow")))
    conn = await RawConnection.open(port, request[:40])
    await until(lambda: bool(handed_to_tornado))  # the server peeked the first part
    await conn.send(request[40:])
    assert (await conn.read_head())[0] == 101
    assert (await conn.read_json())["user"] == "slow"
    conn.discard()


@pytest.mark.gen_test
async def test_a_head_that_comes_after_a_while_whole_is_answered_natively(
    port: int, http_server: Listener, handed_to_tornado: list[Any]
) -> None:
    conn = await RawConnection.open(port)
    await until(lambda: http_server.native is not None and http_server.native.waiting == 1)  # accepted, nothing read yet
    await conn.send(upgrade_request(bearer(mint("late"))))
    assert (await conn.read_head())[0] == 101
    assert (await conn.read_json())["user"] == "late"
    assert not handed_to_tornado
    await conn.close_cleanly()


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_header_size": "2048"}])
async def test_a_head_past_max_header_size_is_refused_by_tornado(
    port: int, handed_to_tornado: list[Any]
) -> None:
    fits = upgrade_request({**bearer(mint()), "X-Pad": "p" * 1200})
    conn = await RawConnection.open(port, fits)
    assert (await conn.read_head())[0] == 101
    assert not handed_to_tornado
    conn.discard()
    too_big = upgrade_request({**bearer(mint()), "X-Pad": "p" * 2100})
    conn = await RawConnection.open(port, too_big)
    assert not (await conn.wait_eof()).startswith(b"HTTP/1.1 101")
    assert len(handed_to_tornado) == 1


# --- the bounds on a head, both paths ----------------------------------------------------


@BOTH
@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"header_timeout": "1"}])
async def test_a_client_that_sends_nothing_is_cut_after_the_header_timeout(
    port: int, handshake_path: str
) -> None:
    started = time.monotonic()
    conn = await RawConnection.open(port)
    assert await conn.wait_eof(timeout=5) == b""  # closed, no answer
    assert 0.9 < time.monotonic() - started < 2.0


@BOTH
@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"header_timeout": "1"}])
async def test_a_head_begun_late_must_still_end_within_the_header_timeout(
    port: int, handshake_path: str
) -> None:
    started = time.monotonic()
    conn = await RawConnection.open(port)
    await asyncio.sleep(0.6)
    await conn.send(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
    assert await conn.wait_eof(timeout=5) == b""
    # Counted from the accept, not from the first byte (that would be 1.6 s).
    assert 0.9 < time.monotonic() - started < 1.45


@BOTH
@pytest.mark.gen_test
async def test_a_head_that_comes_once_the_drain_began_is_answered_503(
    port: int, state: Services, http_server: Listener, handshake_path: str
) -> None:
    # Accepted just before the shutdown stopped the listener (as Server.shutdown
    # does: draining, then stop()), its head still gets the contract's answer.
    conn = await RawConnection.open(port)
    if http_server.native is not None:
        await until(lambda: http_server.native is not None and http_server.native.waiting == 1)
    state.draining = True
    http_server.stop()
    await conn.send(upgrade_request(bearer(mint())))
    assert await conn.read_head() == (503, {**conn.headers, "retry-after": "5"})
    assert json.loads(await conn.wait_eof())["error"] == "draining"


@pytest.mark.gen_test
async def test_closing_the_listeners_connections_closes_those_waiting_for_a_head(
    port: int, http_server: Listener
) -> None:
    conn = await RawConnection.open(port)
    await until(lambda: http_server.native is not None and http_server.native.waiting == 1)
    http_server.stop()
    await http_server.close_all_connections()
    assert await conn.wait_eof(timeout=2) == b""


# --- after the 101 -----------------------------------------------------------------------


@BOTH
@pytest.mark.gen_test
async def test_the_101_and_the_welcome_arrive_in_one_segment(
    port: int, handshake_path: str
) -> None:
    conn = await raw_connect(port, bearer(mint("one")))
    assert conn.status == 101
    assert (await conn.read_json())["type"] == "welcome"
    segments = conn.data_segments_received()
    if segments is None:
        pytest.skip("no tcpi_data_segs_in on this system")
    assert segments == 1
    conn.discard()


@BOTH
@pytest.mark.gen_test
async def test_frames_pipelined_behind_the_handshake_are_served(
    port: int, handshake_path: str
) -> None:
    frames = b"".join(text_frame({"type": "echo", "data": n, "id": n}) for n in range(3))
    conn = await raw_connect(port, bearer(mint("eager")), pipelined=frames)
    assert conn.status == 101
    assert (await conn.read_json())["type"] == "welcome"
    assert [await conn.read_json() for _ in range(3)] == [
        {"type": "echo", "data": n, "id": n} for n in range(3)]
    await conn.close_cleanly()
