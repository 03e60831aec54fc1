"""What the client raises: one root, the server's error replies by code, and its own failures.

Every server ``error`` reply becomes a :class:`ServerError` whose subclass is
chosen by the reply's ``code`` (``forbidden`` → :class:`Forbidden`...), so a
caller catches the condition it can act on rather than comparing strings.
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """The root of everything :mod:`wsserver.client` raises on purpose."""


class ServerError(ClientError):
    """The server answered a request with ``{"type": "error", "code": ...}``.

    Attributes:
        code: the server's error code (``bad_request``, ``forbidden``...).
        reply: the whole error message as received.
        retry_after: seconds to wait, when the server said (``rate_limited``,
            ``unavailable``), else None.
    """

    code = "error"

    def __init__(self, message: str, reply: dict[str, Any] | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.reply = reply or {}
        if code is not None:
            self.code = code
        retry_after = self.reply.get("retry_after")
        self.retry_after: float | None = (
            float(retry_after) if isinstance(retry_after, int | float) else None
        )


class BadRequest(ServerError):
    """Malformed message, bad task arguments, publish without join."""

    code = "bad_request"


class UnknownType(ServerError):
    """The server does not know this message type (e.g. ``rpc`` on a server without it)."""

    code = "unknown_type"


class UnknownTask(ServerError):
    """No task of that name is registered."""

    code = "unknown_task"


class Forbidden(ServerError):
    """Nothing grants this join, publish, presence or history request."""

    code = "forbidden"


class RateLimited(ServerError):
    """The user's message bucket was empty; ``retry_after`` says when to try."""

    code = "rate_limited"


class Busy(ServerError):
    """The task pool, or this connection's or user's task allowance, is full."""

    code = "busy"


class TaskTimeout(ServerError):
    """The task got no result within the server's ``--task-timeout``."""

    code = "timeout"


class TaskFailed(ServerError):
    """The task raised, or its worker process died."""

    code = "task_failed"


class Unavailable(ServerError):
    """The broker (or an RPC backend) cannot be reached right now; retry later."""

    code = "unavailable"


class RoomFull(ServerError):
    """The room has as many members on that node as the server allows."""

    code = "room_full"


class InternalError(ServerError):
    """A bug in the server while serving this message (logged there)."""

    code = "internal_error"


_BY_CODE: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (BadRequest, UnknownType, UnknownTask, Forbidden, RateLimited, Busy,
                TaskTimeout, TaskFailed, Unavailable, RoomFull, InternalError)
}


def server_error(reply: dict[str, Any]) -> ServerError:
    """The typed exception for an ``error`` reply; an unknown code gives a plain ServerError."""
    code = reply.get("code")
    code = code if isinstance(code, str) else "error"
    message = reply.get("message")
    text = f"{code}: {message}" if isinstance(message, str) and message else code
    cls = _BY_CODE.get(code, ServerError)
    return cls(text, reply, code=code)


class RequestTimeout(ClientError):
    """No reply within the request's timeout (it may still have been served)."""


class ConnectionLost(ClientError):
    """The connection dropped after the request was sent and before its reply.

    The server may or may not have served it: a publish may have gone out.
    """


class Closed(ClientError):
    """The client stopped for good: closed by the caller, or by a close code
    that retrying cannot fix (4003, 1008, 1009...) or a refused handshake.

    Attributes:
        code: the WebSocket close code, or the HTTP status of a refused
            handshake; None when the caller closed the client (or the
            client itself failed: see its log).
        reason: the server's reason, or a description.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed ({code}): {reason}" if code is not None else reason)
        self.code = code
        self.reason = reason


class RoomLost(ClientError):
    """The client is out of a room it did not leave: the server removed it
    (``left`` with a reason, e.g. ``forbidden`` after a token refresh) or
    refused to re-join it after a reconnect.

    Attributes:
        room: the room's name.
        reason: the server's reason or error code.
        error: the server's refusal of the re-join, when that is what happened.
    """

    def __init__(self, room: str, reason: str, error: ServerError | None = None) -> None:
        super().__init__(f"no longer in {room!r}: {reason}")
        self.room = room
        self.reason = reason
        self.error = error


class ApiError(ClientError):
    """The server API (``/api/...``) answered with an error status.

    Attributes:
        status: the HTTP status (599 when no answer came at all).
        code: the ``error`` field of the answer (``bad_request``, ``unavailable``...).
        retry_after: the ``Retry-After`` seconds, when given.
    """

    def __init__(self, status: int, code: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" if message else f"{status} {code}")
        self.status = status
        self.code = code
        self.retry_after = retry_after


class ApiUnauthorized(ApiError):
    """401: the API key is missing or wrong."""


class ApiBadRequest(ApiError):
    """400: malformed input (a bad room name, a namespace without presence...)."""


class EpochChanged(ApiError):
    """409 from ``history``: the room's history was lost since that epoch; reload."""


class ApiUnavailable(ApiError):
    """503 (the broker cannot be reached) or no answer, after every retry."""


def api_error(status: int, body: Any, retry_after: float | None = None) -> ApiError:
    """The typed error for an API answer of ``status`` with JSON ``body``."""
    code = body.get("error") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    code = code if isinstance(code, str) else "http_error"
    text = message if isinstance(message, str) else ""
    cls: type[ApiError] = {401: ApiUnauthorized, 400: ApiBadRequest, 409: EpochChanged,
                           503: ApiUnavailable, 599: ApiUnavailable}.get(status, ApiError)
    return cls(status, code, text, retry_after)
