"""A Python client for wsserver: reconnects, refreshes its token and recovers rooms.

``Client`` and ``Room`` (the I/O, over aiohttp) are loaded on first use, so
the pure parts (:mod:`.decisions`, :mod:`.machine`, :mod:`.messages`,
:mod:`.errors`) import without it; ``wsserver.client.api`` is the
server-side client of the HTTP API. See docs/python-client.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wsserver.client.errors import (
    BadRequest,
    Busy,
    ClientError,
    Closed,
    ConnectionLost,
    Forbidden,
    InternalError,
    RateLimited,
    RequestTimeout,
    RoomFull,
    RoomLost,
    ServerError,
    TaskFailed,
    TaskTimeout,
    Unavailable,
    UnknownTask,
    UnknownType,
)
from wsserver.client.messages import Gap, Message, Position, Presence

if TYPE_CHECKING:
    from wsserver.client.connection import Client, Room

__all__ = [
    "BadRequest", "Busy", "Client", "ClientError", "Closed", "ConnectionLost", "Forbidden",
    "Gap", "InternalError", "Message", "Position", "Presence", "RateLimited", "RequestTimeout",
    "Room", "RoomFull", "RoomLost", "ServerError", "TaskFailed", "TaskTimeout", "Unavailable",
    "UnknownTask", "UnknownType",
]

_LAZY = {"Client", "Room"}


def __getattr__(name: str) -> Any:
    """``Client`` and ``Room`` on first use: importing them loads aiohttp."""
    if name in _LAZY:
        from wsserver.client import connection

        return getattr(connection, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
