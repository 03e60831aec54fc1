"""Malformed HTTP requests in the log (issue 20, item 1), against a real process.

Tornado logs a request whose headers it cannot parse with the parser's
message, which quotes the offending header value: with one bare CR, that is
every header after it, bearer tokens and API keys included, about 15 kB per
request and no limit per client. The server logs the request line and the
reason instead, redacted, throttled per address like the refused handshakes.
"""

from __future__ import annotations

import inspect
import re
import socket
from typing import Any

import pytest
from tornado import http1connection
from tornado.http1connection import HTTP1Connection

from tests.support.metrics import value
from tests.support.servers import RunningServer
from wsserver.edge.tornado_internals import MALFORMED_MESSAGE

SECRET = "SECRET-bearer-0123456789"
API_KEY = "SECRET-apikey-0123456789"
#: Enough headers to reach about 15 kB, under --max-header-size (16 kB).
FILLER = "".join(f"X-Filler-{i}: {'v' * 100}\r\n" for i in range(130))
LINE = re.compile(r"malformed request refused")
#: The log line Tornado writes for these requests on its own.
TORNADO_LINE = "Malformed HTTP message"


def bare_cr_request() -> bytes:
    """One bare CR after the token: Tornado reads every header after it as its value."""
    headers = (f"Authorization: Bearer {SECRET}\rX-API-Key: {API_KEY}\r"
               + FILLER.replace("\r\n", "\r"))
    return (f"GET /ws?token={SECRET} HTTP/1.1\r\nHost: x\r\n{headers}\r\n\r\n").encode()


def control_byte_request() -> bytes:
    """A control byte at the end of the token's header: the value alone is quoted."""
    return (f"GET /ws HTTP/1.1\r\nHost: x\r\n{FILLER}Authorization: Bearer {SECRET}\x01\r\n"
            f"X-API-Key: {API_KEY}\r\n\r\n").encode()


def content_length_request() -> bytes:
    """Headers that parse, then a Content-Length Tornado refuses while reading the body."""
    return (f"POST /api/publish?token={SECRET} HTTP/1.1\r\nHost: x\r\n{FILLER}"
            f"X-API-Key: {API_KEY}\r\nContent-Length: 1{SECRET}\r\n\r\n").encode()


def send(srv: RunningServer, request: bytes) -> bytes:
    """Send ``request`` on a new connection; the whole answer, up to the server's FIN."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def settle(srv: RunningServer, mark: str) -> str:
    """Every line logged so far: a request for ``mark`` logs an access line after them."""
    send(srv, f"GET /{mark} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    srv.wait_for_log(f"404 GET /{mark} ")
    return srv.logs()


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason", "line"),
    [
        (bare_cr_request(), 400, "Invalid header value", "GET /ws?token=[redacted] HTTP/1.1"),
        (control_byte_request(), 400, "Invalid header value", "GET /ws HTTP/1.1"),
        # The API answers first (404: no key here), then Tornado fails the body.
        (content_length_request(), 404, "Only integer Content-Length is allowed",
         "POST /api/publish?token=[redacted] HTTP/1.1"),
    ],
    ids=["bare-cr", "control-byte", "content-length"],
)
def test_a_malformed_request_logs_its_line_and_reason_only(
    run_server: Any, request_bytes: bytes, status: int, reason: str, line: str
) -> None:
    srv = run_server()
    assert len(request_bytes) > 14_000
    assert send(srv, request_bytes).startswith(f"HTTP/1.1 {status} ".encode())
    logs = settle(srv, "after-one")
    assert SECRET not in logs and API_KEY not in logs
    assert TORNADO_LINE not in logs
    (logged,) = [entry for entry in logs.splitlines() if LINE.search(entry)]
    assert reason in logged and f"request={line}" in logged and "addr=127.0.0.1" in logged
    assert len(logged) < 300, logged


def test_a_flood_of_malformed_requests_logs_a_bounded_number_of_lines(run_server: Any) -> None:
    srv = run_server()
    before = len(settle(srv, "before").encode())
    for _ in range(100):
        assert send(srv, bare_cr_request()).startswith(b"HTTP/1.1 400 ")
    logs = settle(srv, "after-flood")
    assert SECRET not in logs
    logged = [entry for entry in logs.splitlines() if LINE.search(entry)]
    assert len(logged) == 10  # the refusal throttle's burst per address and minute
    # 100 requests of about 15 kB each: a few kB of log in all, not 1.5 MB.
    assert len(logs.encode()) - before < 4000
    assert value(srv.metrics(), "wsserver_rejections_total", reason="malformed_request") == 100


def test_the_tornado_internals_it_reads_are_still_there() -> None:
    """wsserver.edge.tornado_internals reads these; a Tornado upgrade that moves
    them must fail here, not leak headers into the log again."""
    code = HTTP1Connection._read_message_inner.__code__
    assert {"self", "header_data"} <= set(code.co_varnames)
    source = inspect.getsource(http1connection)
    assert f'gen_log.info("{MALFORMED_MESSAGE}", self.context, e)' in source
    assert "self._request_start_line = req_start_line" in source
