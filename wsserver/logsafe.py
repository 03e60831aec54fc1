"""Making client-controlled text safe to put in a log line.

Two dangers: a token in a request URI (``?token=...``, ``?ticket=...``) would leak a credential
to whoever reads the logs, and a control character (a newline, an ANSI escape)
in a user name, an address or a URI would let a client forge or hide log
lines. :func:`redact` removes tokens; :func:`escape` makes any value one
printable line.
"""

from __future__ import annotations

import re
import unicodedata

#: Credentials that may travel in a query string: a JWT (``/ws?token=``) and
#: an HTTP-streaming ticket (``/sse?ticket=``).
_TOKEN_IN_QUERY = re.compile(r"([?&](?:token|ticket)=)[^&#]*", re.IGNORECASE)
#: Longest client value written to one log line; the rest is cut.
MAX_LOGGED_LENGTH = 256


def redact(uri: str) -> str:
    """``uri`` with any ``token`` or ``ticket`` query parameter replaced by ``[redacted]``."""
    lowered = uri.lower()
    if "token=" not in lowered and "ticket=" not in lowered:
        return uri
    return _TOKEN_IN_QUERY.sub(r"\1[redacted]", uri)


def redact_request_line(line: str) -> str:
    """An HTTP request line ("GET /ws?token=... HTTP/1.1") with its target redacted.

    The target is everything between the first and the last space, so a
    malformed line that splits a token with spaces still hides all of it.
    """
    method, space, rest = line.partition(" ")
    target, last, version = rest.rpartition(" ")
    if not space or not last:
        return redact(line)
    return f"{method} {redact(target)} {version}"


def _printable(text: str) -> bool:
    return text.isprintable() and "\\" not in text


def escape(value: object) -> str:
    """``value`` as one printable line: control and other Unicode category C
    characters (and backslashes) as ``repr``-style escapes, cut to
    :data:`MAX_LOGGED_LENGTH` characters.

    Plain text, the usual case, is returned as it is.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_LOGGED_LENGTH:
        text = text[:MAX_LOGGED_LENGTH] + "..."
    if _printable(text):
        return text
    return "".join(_escape_char(ch) for ch in text)


def _escape_char(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch.isprintable() and not unicodedata.category(ch).startswith("C"):
        return ch
    # repr() gives \n, \t, \x1b, \u2028, \U000e0001 ... without its quotes.
    return repr(ch)[1:-1] if repr(ch)[1:-1] != ch else f"\\u{ord(ch):04x}"


#: The words a parser's message starts with, up to the first quote or colon:
#: Tornado's HTTP errors put the client's text after them ("Invalid header
#: value 'Bearer ...'", "Only integer Content-Length is allowed: ...").
_LEADING_WORDS = re.compile(r"[A-Za-z][A-Za-z0-9 ,.\-/]*")


def error_reason(message: str) -> str:
    """The fixed part of a parser's error ``message``, without the client's text it quotes.

    "Invalid header value 'Bearer eyJ...'" is "Invalid header value"; a
    message without leading words is "malformed".
    """
    match = _LEADING_WORDS.match(message)
    words = match.group(0).strip(" ,.-/") if match else ""
    return words or "malformed"
