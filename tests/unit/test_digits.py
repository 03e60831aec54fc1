"""parse_digits: ASCII digits only, whatever int() and str.isdigit() accept."""

from __future__ import annotations

import pytest

from wsserver.digits import parse_digits


@pytest.mark.parametrize(("text", "expected"), [("0", 0), ("007", 7), ("9" * 18, 10**18 - 1)])
def test_ascii_digits(text: str, expected: int) -> None:
    assert parse_digits(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "", " 1", "1 ", "+1", "-1", "1_000", "1.0", "1e3", "0x1",
        "\u00b2",  # superscript two: isdigit() is True, int() raises
        "\u0663",  # Arabic-Indic three: int() gives 3
        "\uff11",  # fullwidth one: int() gives 1
        "1\u00b2",
        "9" * 19,
    ],
)
def test_everything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="ASCII digits"):
        parse_digits(text)


def test_the_digit_bound_is_the_callers() -> None:
    assert parse_digits("12345", max_digits=5) == 12345
    with pytest.raises(ValueError):
        parse_digits("123456", max_digits=5)
