"""A Python client for wsserver: reconnects, refreshes its token and recovers rooms.

The pure parts: :mod:`.decisions`, :mod:`.machine`, :mod:`.messages`, :mod:`.errors`.
"""

from __future__ import annotations

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

__all__ = [
    "BadRequest", "Busy", "ClientError", "Closed", "ConnectionLost", "Forbidden",
    "Gap", "InternalError", "Message", "Position", "Presence", "RateLimited", "RequestTimeout",
    "RoomFull", "RoomLost", "ServerError", "TaskFailed", "TaskTimeout", "Unavailable",
    "UnknownTask", "UnknownType",
]
