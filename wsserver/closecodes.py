"""WebSocket close codes: one table for the server, the docs and the browser client.

RFC 6455 section 7.4 defines 1000-1015; 4000-4999 are for applications. Each
code says what a client should do, and ``static/wsclient.js`` acts on the same
table (a test keeps the two equal).
"""

from __future__ import annotations

from enum import IntEnum

# What a client should do after a close, as the contract's table says.
NEVER = "never"
SOON = "soon"  # after a short random delay
BACKOFF = "backoff"  # with exponential backoff and jitter
NEW_TOKEN = "new_token"  # get a new token, then reconnect
FIX_CLIENT = "fix_client"


class CloseCode(IntEnum):
    """Every close code wsserver sends, with the client's expected reaction."""

    reconnect: str
    meaning: str

    def __new__(cls, value: int, meaning: str, reconnect: str) -> CloseCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        member.reconnect = reconnect
        return member

    NORMAL = 1000, "normal closure", NEVER
    GOING_AWAY = 1001, "server shutting down", SOON
    PROTOCOL_ERROR = 1002, "protocol error", FIX_CLIENT
    INVALID_DATA = 1007, "invalid UTF-8 in a text message", FIX_CLIENT
    POLICY = 1008, "policy violation", FIX_CLIENT
    TOO_BIG = 1009, "message too big", FIX_CLIENT
    INTERNAL = 1011, "internal error or keepalive timeout", BACKOFF
    SERVICE_RESTART = 1012, "service restart (a paced drain, --drain-rate)", BACKOFF
    TOKEN = 4001, "token missing, invalid or expired", NEW_TOKEN
    FORBIDDEN = 4003, "disconnected by the server, or not permitted", NEVER
    TOO_MANY_FOR_USER = 4008, "too many connections for this user", BACKOFF
    SLOW_CONSUMER = 4009, "slow consumer: the client did not read fast enough", BACKOFF
    RATE_LIMITED = 4029, "kept sending while rate limited", BACKOFF


#: Codes a peer may put on the wire (RFC 6455 section 7.4.1 and 7.4.2): 1000-1003,
#: 1007-1014 and 3000-4999. 1004-1006 and 1015 are reserved for reporting only.
def valid_on_wire(code: int) -> bool:
    """True when a close frame may carry ``code`` (otherwise answer 1002)."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


#: The fixed label set for close-code metrics: client-chosen codes outside
#: this table are counted as "other", never as a label of their own.
METRIC_LABELS = frozenset(str(int(code)) for code in CloseCode) | {"1005", "1006", "other"}


def metric_label(code: int) -> str:
    """``code`` as a bounded metric label."""
    text = str(code)
    return text if text in METRIC_LABELS else "other"
