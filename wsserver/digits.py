"""Whole numbers a client sends, as ASCII digits only.

``str.isdigit()`` is true for ``"²"``, which ``int()`` then refuses (an
uncaught ValueError: a 500), and ``int()`` takes ``"٣"`` (Arabic-Indic
three) and ``"\\uff11"`` (fullwidth one), as well as ``"1_000"`` and surrounding
spaces. HTTP (RFC 9110 section 8.6, ``1*DIGIT``) and every number of this
server's protocol mean ASCII ``0-9``; anything else is a client error.
"""

from __future__ import annotations

import re

#: ``[0-9]`` is a range of code points, so no Unicode digit matches it.
_DIGITS = re.compile(r"[0-9]+")
#: 18 digits always fit a signed 64-bit integer (Redis stream ids, offsets).
MAX_DIGITS = 18


def parse_digits(text: str, max_digits: int = MAX_DIGITS) -> int:
    """The non-negative integer spelled by ``text``: 1 to ``max_digits`` ASCII digits.

    Raises:
        ValueError: anything else (signs, spaces, underscores, other scripts'
            digits, superscripts, too many digits).
    """
    if len(text) > max_digits or _DIGITS.fullmatch(text) is None:
        raise ValueError(f"not 1 to {max_digits} ASCII digits")
    return int(text)
