"""Client-controlled text made safe for log lines: tokens redacted, controls escaped."""

import pytest

from wsserver.logsafe import MAX_LOGGED_LENGTH, escape, redact


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
    ],
)
def test_redact(uri: str, expected: str) -> None:
    assert redact(uri) == expected
