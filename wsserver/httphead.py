"""An HTTP/1.1 request head, read strictly, without an HTTP server.

The native upgrade path (``wsserver.edge.native``) reads a WebSocket
upgrade's head itself instead of handing it to Tornado. It takes only a head
that Tornado would read the same way, so that the two paths cannot disagree
on what a request says: :func:`parse_head` returns None for anything outside
that subset (a bare LF, a folded or malformed header line, a byte outside
printable ASCII, a request line that is not ``METHOD SP target SP HTTP/1.x``),
and the caller gives such a request to Tornado untouched, which answers it as
it always has (a 400, most of the time).

Pure core: bytes in, a :class:`RequestHead` or None out.
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: RFC 9110 section 5.6.2: a token's characters (method, header name).
_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
#: ``METHOD SP request-target SP HTTP/1.d CRLF``: the target printable ASCII
#: (Tornado's rule also admits bytes above 0x7F; those requests go to it).
_REQUEST_LINE = re.compile(rf"({_TCHAR}+) ([\x21-\x7e]+) (HTTP/1\.[0-9])\r\n")
#: Header lines, then the empty line. A name is a token right before its
#: colon (no whitespace: RFC 9112 section 5.1); a value printable ASCII, spaces
#: and tabs (RFC 9110 section 5.5, without obs-text); no folded lines.
_FIELDS = re.compile(rf"(?:{_TCHAR}+:[\t\x20-\x7e]*\r\n)*\r\n")
#: What ends a head.
END = b"\r\n\r\n"


class RequestHead(NamedTuple):
    """A request line and its header fields.

    ``headers`` maps lower-case names to values, a repeated field's values
    joined with ``,`` (RFC 9110 section 5.3), as Tornado's ``HTTPHeaders`` does.
    """

    method: str
    #: The request target as sent (``/ws?token=...``).
    target: str
    #: The target up to its ``?``; the part after it is :attr:`query`.
    path: str
    query: str
    version: str
    headers: dict[str, str]

    def header(self, name: str) -> str | None:
        """The field ``name`` (any case), or None when absent."""
        return self.headers.get(name.lower())


def parse_head(data: bytes) -> RequestHead | None:
    """The request whose head is ``data`` (through the blank line that ends
    it), or None when it is not in the strict subset this module reads."""
    if not data.endswith(END):
        return None
    text = data.decode("latin-1")
    line = _REQUEST_LINE.match(text)
    if line is None:
        return None
    start = line.end()
    if _FIELDS.fullmatch(text, start) is None:
        return None
    headers: dict[str, str] = {}
    if len(text) - start > 2:
        for field in text[start:-4].split("\r\n"):
            name, _, value = field.partition(":")
            name = name.lower()
            value = value.strip(" \t")
            earlier = headers.get(name)
            headers[name] = value if earlier is None else earlier + "," + value
    method, target, version = line.groups()
    path, _, query = target.partition("?")
    return RequestHead(method, target, path, query, version, headers)
