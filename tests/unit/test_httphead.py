"""The strict request-head reader of the native upgrade path: what it takes, and
that it reads what it takes exactly as Tornado does."""

from __future__ import annotations

import pytest
from tornado.httputil import HTTPHeaders, parse_request_start_line

from wsserver.httphead import parse_head

UPGRADE = (
    b"GET /ws?token=abc HTTP/1.1\r\n"
    b"Host: example.com:8080\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version:13\r\n"
    b"Cookie: a=1\r\n"
    b"cookie: b=2\r\n"
    b"X-Empty:\r\n"
    b"X-Spaced: \t padded value \t\r\n"
    b"\r\n"
)


def test_a_browser_upgrade_is_read() -> None:
    head = parse_head(UPGRADE)
    assert head is not None
    assert (head.method, head.target, head.path, head.query, head.version) == (
        "GET", "/ws?token=abc", "/ws", "token=abc", "HTTP/1.1")
    assert head.header("HOST") == "example.com:8080"
    assert head.header("sec-websocket-version") == "13"
    # Repeated fields are one value, joined with commas (RFC 9110 section 5.3).
    assert head.header("Cookie") == "a=1,b=2"
    assert head.header("X-Empty") == ""
    assert head.header("X-Spaced") == "padded value"
    assert head.header("Origin") is None


def test_a_head_without_fields_is_read() -> None:
    head = parse_head(b"GET / HTTP/1.0\r\n\r\n")
    assert head is not None
    assert (head.path, head.query, head.version, head.headers) == ("/", "", "HTTP/1.0", {})


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(UPGRADE[:-2], id="not ended by an empty line"),
        pytest.param(UPGRADE.replace(b"\r\n", b"\n"), id="LF line ends"),
        pytest.param(UPGRADE.replace(b"Cookie: a=1\r\n", b"Cookie: a=1\n"), id="one bare LF"),
        pytest.param(UPGRADE.replace(b"Cookie: a=1\r\n", b"Cookie: a=1\r\n folded\r\n"),
                     id="a folded line"),
        pytest.param(UPGRADE.replace(b"Cookie:", b"Cookie :"), id="space before the colon"),
        pytest.param(UPGRADE.replace(b"Cookie: a=1", b"Cookie a=1"), id="no colon"),
        pytest.param(UPGRADE.replace(b"a=1", b"caf\xe9"), id="a byte above 0x7F"),
        pytest.param(UPGRADE.replace(b"a=1", b"a\x01"), id="a control character"),
        pytest.param(UPGRADE.replace(b"a=1", b"a\rb"), id="a CR inside a value"),
        pytest.param(UPGRADE.replace(b"/ws?token=abc", b"/w\xe9"), id="a target above 0x7F"),
        pytest.param(UPGRADE.replace(b"GET ", b"GET  "), id="two spaces"),
        pytest.param(UPGRADE.replace(b"HTTP/1.1", b"HTTP/2.0"), id="HTTP/2"),
        pytest.param(UPGRADE.replace(b"GET", b"G(T"), id="a method that is no token"),
        pytest.param(b"\r\n" + UPGRADE, id="an empty line first"),
        pytest.param(b"\r\n\r\n", id="nothing"),
    ],
)
def test_anything_outside_the_strict_subset_is_left_alone(data: bytes) -> None:
    assert parse_head(data) is None


@pytest.mark.parametrize(
    "data",
    [
        UPGRADE,
        b"GET /ws HTTP/1.1\r\nHost: h\r\nA: x\r\na: y\r\nA: \r\nB:  \t \r\n\r\n",
        b"POST /api/x?a=b?c HTTP/1.0\r\nContent-Length: 0\r\nX-Tab:\ta\tb\t\r\n\r\n",
    ],
)
def test_what_is_read_is_what_tornado_reads(data: bytes) -> None:
    head = parse_head(data)
    assert head is not None
    text = data.decode("latin-1")
    line, _, fields = text.partition("\r\n")
    start = parse_request_start_line(line)
    assert (head.method, head.target, head.version) == (start.method, start.path, start.version)
    theirs = HTTPHeaders.parse(fields)
    assert {name.lower() for name in theirs} == set(head.headers)
    for name in theirs:
        assert head.header(name) == theirs[name]
