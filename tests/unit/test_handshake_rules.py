"""The handshake's pure parts: which heads the native path takes, the token in a
query as Tornado reads it, the upgrade's own checks and the 101."""

from __future__ import annotations

from typing import Any

import pytest
import tornado.web
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

from wsserver.handshake import (
    Answer,
    NotNative,
    native_request,
    query_token,
    switching_protocols,
    upgrade_problem,
)
from wsserver.httphead import parse_head


def head_of(*lines: str, target: str = "/ws", method: str = "GET",
            version: str = "HTTP/1.1") -> Any:
    fields = lines or (
        "Host: 127.0.0.1:8000", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
    )
    text = "\r\n".join((f"{method} {target} {version}", *fields)) + "\r\n\r\n"
    head = parse_head(text.encode("latin-1"))
    assert head is not None
    return head


UPGRADE = ("Host: 127.0.0.1:8000", "Upgrade: websocket", "Connection: Upgrade",
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13")


def test_a_plain_upgrade_is_taken_with_its_query_token() -> None:
    assert native_request(head_of()) is None
    assert native_request(head_of(target="/ws?token=abc.def")) == "abc.def"
    browser = (*UPGRADE[:2], "Connection: keep-alive, Upgrade", *UPGRADE[3:],
               "Origin: https://app.example", "Sec-WebSocket-Extensions: permessage-deflate")
    assert native_request(head_of(*browser)) is None
    # Hosts as names, IPv6 literals, with and without ports.
    for host in ("example.com", "[::1]:8000", "ws.example.com:443"):
        assert native_request(head_of(f"Host: {host}", *UPGRADE[1:])) is None


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(head_of(target="/ws/"), id="another path"),
        pytest.param(head_of(target="/w%73"), id="an encoded path"),
        pytest.param(head_of(method="POST"), id="POST"),
        pytest.param(head_of(version="HTTP/1.0"), id="HTTP/1.0"),
        pytest.param(head_of(*UPGRADE[1:]), id="no Host"),
        pytest.param(head_of("Host: a,b", *UPGRADE[1:]), id="two hosts"),
        pytest.param(head_of("Host: user@host", *UPGRADE[1:]), id="a host Tornado reads its way"),
        pytest.param(head_of(*UPGRADE, "Content-Length: 0"), id="a Content-Length"),
        pytest.param(head_of(*UPGRADE, "Transfer-Encoding: chunked"), id="a Transfer-Encoding"),
        pytest.param(head_of(UPGRADE[0], "Upgrade: h2c", *UPGRADE[2:]), id="not websocket"),
        pytest.param(head_of(*UPGRADE[:2], "Connection: keep-alive", *UPGRADE[3:]),
                     id="no Connection: Upgrade"),
        pytest.param(head_of(*UPGRADE[:4], "Sec-WebSocket-Version: 8"), id="version 8"),
        pytest.param(head_of(*UPGRADE[:3], UPGRADE[4]), id="no key"),
        pytest.param(head_of(*UPGRADE, target="/ws?token=%FF"), id="a token that is not UTF-8"),
    ],
)
def test_anything_else_goes_to_tornado(head: Any) -> None:
    with pytest.raises(NotNative):
        native_request(head)


class _Connection:
    """What Tornado's RequestHandler needs of a connection to be built."""

    def set_close_callback(self, callback: Any) -> None:
        pass


def tornados_token(query: str) -> str | None:
    """``get_query_argument("token", None)`` of a real Tornado handler; NotNative for its 400."""
    request = HTTPServerRequest(connection=_Connection(),
                                start_line=RequestStartLine("GET", "/ws?" + query, "HTTP/1.1"),
                                headers=HTTPHeaders({"Host": "h"}))
    handler = tornado.web.RequestHandler(tornado.web.Application(), request)
    try:
        return handler.get_query_argument("token", None)
    except tornado.web.HTTPError:
        raise NotNative("400") from None


@pytest.mark.parametrize(
    "query",
    ["", "token=abc.def.ghi", "a=1&token=x&token=y", "token=%41%42", "token=+a+b+",
     "token=%00x%1fy%7f", "token=%C3%A9t%C3%A9", "token=", "tokens=1", "x=token",
     "token", "token=a;b", "token=%FF", "&&token=1&", "token=%zz",
     # A percent-encoded name is decoded before it is compared.
     "%74oken=abc", "t%6Fken=%FF", "%74%6F%6B%65%6E=x&token=y", "tok%65n=z"],
)
def test_the_query_token_is_read_as_tornado_reads_it(query: str) -> None:
    try:
        expected: str | type[NotNative] | None = tornados_token(query)
    except NotNative:
        expected = NotNative
    try:
        got: str | type[NotNative] | None = query_token(query)
    except NotNative:
        got = NotNative
    assert got == expected


@pytest.mark.parametrize(
    ("fields", "answer"),
    [
        ({"Upgrade": "WebSocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
          "Host": "h", "Sec-WebSocket-Key": "k"}, None),
        ({"Upgrade": "websocket", "Connection": "keep-alive,  UPGRADE ",
          "Sec-WebSocket-Version": "13", "Host": "h", "Sec-WebSocket-Key": "k"}, None),
        ({"Connection": "Upgrade"}, Answer(400, 'Can "Upgrade" only to "WebSocket".')),
        ({"Upgrade": "websocket", "Connection": "upgraded"},
         Answer(400, '"Connection" must be "Upgrade".')),
        ({"Upgrade": "websocket", "Connection": "Upgrade", "Origin": "http://evil"},
         Answer(403, "Cross origin websockets not allowed")),
        ({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "8"},
         Answer(426, "Upgrade Required", (("Sec-WebSocket-Version", "13"),))),
        ({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
          "Host": "h"}, Answer(400, "Missing/Invalid WebSocket headers")),
    ],
)
def test_the_upgrades_own_checks(fields: dict[str, str], answer: Answer | None) -> None:
    lower = {name.lower(): value for name, value in fields.items()}
    assert upgrade_problem(lambda name: lower.get(name.lower()), lambda o: o == "ok") == answer


def test_the_101_carries_the_accept_value_of_rfc_6455() -> None:
    # RFC 6455 section 1.3's example key and answer.
    assert switching_protocols("dGhlIHNhbXBsZSBub25jZQ==") == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
    with_both = switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", "bearer", "permessage-deflate")
    assert with_both.endswith(b"\r\nSec-WebSocket-Protocol: bearer\r\n"
                              b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
