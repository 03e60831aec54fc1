"""Server-to-client WebSocket frames, built once and written to many streams.

Without compression a frame the server sends is the same bytes for every
recipient (servers do not mask, RFC 6455 section 5.1), so a broadcast can
encode the JSON and build the frame once instead of once per member.
"""

from __future__ import annotations

import struct

OPCODE_TEXT = 0x1
OPCODE_PING = 0x9
_FIN = 0x80

#: An empty ping (RFC 6455 section 5.5.2), the same bytes for every peer.
PING = bytes([_FIN | OPCODE_PING, 0])


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame carrying ``payload`` (RFC 6455 section 5.2)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", _FIN | OPCODE_TEXT, length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", _FIN | OPCODE_TEXT, 126, length)
    else:
        header = struct.pack("!BBQ", _FIN | OPCODE_TEXT, 127, length)
    return header + payload
