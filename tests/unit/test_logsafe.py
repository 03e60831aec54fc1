"""Client-controlled text made safe for log lines: tokens redacted, controls escaped."""

import pytest

from wsserver.logsafe import (
    MAX_LOGGED_LENGTH,
    error_reason,
    escape,
    redact,
    redact_request_line,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice", "alice"),
        ("Zoë 😀", "Zoë 😀"),
        ("alice\nINFO wsserver: forged", "alice\\nINFO wsserver: forged"),
        ("a\r\x1b[2Kb", "a\\r\\x1b[2Kb"),
        ("a\u2028b\u200e", "a\\u2028b\\u200e"),
        ("back\\slash\n", "back\\\\slash\\n"),
        (7, "7"),
    ],
)
def test_escape(value: object, expected: str) -> None:
    assert escape(value) == expected
    assert "\n" not in escape(value) and "\r" not in escape(value)


def test_escape_cuts_long_values() -> None:
    assert escape("x" * 10_000) == "x" * MAX_LOGGED_LENGTH + "..."


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/ws?token=eyJ.a.b", "/ws?token=[redacted]"),
        ("/ws?a=1&TOKEN=eyJ&b=2", "/ws?a=1&TOKEN=[redacted]&b=2"),
        ("/ws?mytoken=x", "/ws?mytoken=x"),
        ("/ws", "/ws"),
        # HTTP streaming's single-use ticket stands for a token: never logged either.
        ("/sse?ticket=abc-_123", "/sse?ticket=[redacted]"),
        ("/sse?x=1&Ticket=abc#f", "/sse?x=1&Ticket=[redacted]#f"),
        ("/sse?myticket=x", "/sse?myticket=x"),
    ],
)
def test_redact(uri: str, expected: str) -> None:
    assert redact(uri) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("GET /ws?token=eyJ.a.b HTTP/1.1", "GET /ws?token=[redacted] HTTP/1.1"),
        ("GET /ws?token=eyJ a b&x=1 HTTP/1.1", "GET /ws?token=[redacted]&x=1 HTTP/1.1"),
        ("GET /ws HTTP/1.1", "GET /ws HTTP/1.1"),
        ("GET/ws?token=eyJ", "GET/ws?token=[redacted]"),
        ("GET /ws?token=eyJ", "GET /ws?token=[redacted]"),
    ],
)
def test_redact_request_line(line: str, expected: str) -> None:
    assert redact_request_line(line) == expected


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Invalid header value 'Bearer SECRET\\rX-API-Key: KEY'", "Invalid header value"),
        ("Invalid header name 'Authorization Bearer SECRET'", "Invalid header name"),
        ("Only integer Content-Length is allowed: SECRET", "Only integer Content-Length is allowed"),
        ("Multiple unequal Content-Lengths: '1, SECRET'", "Multiple unequal Content-Lengths"),
        ("Unexpected HTTP version 'SECRET'", "Unexpected HTTP version"),
        ("Malformed HTTP request line", "Malformed HTTP request line"),
        ("no colon in header line", "no colon in header line"),
        ("'SECRET' is not allowed", "malformed"),
        ("", "malformed"),
    ],
)
def test_error_reason_keeps_the_words_and_drops_what_they_quote(
    message: str, expected: str
) -> None:
    assert error_reason(message) == expected
    assert "SECRET" not in error_reason(message)
