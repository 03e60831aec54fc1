"""The error hierarchy: what went wrong, and how the edge answers it.

Three families, each knowing its own answer so that the handlers map them in
one place:

* :class:`Rejection`: refused before the upgrade, answered with an HTTP status.
* :class:`CloseError`: refused or ended after the upgrade, answered with a
  WebSocket close code (RFC 6455 section 7.4) and a short reason.
* :class:`MessageError`: one client message could not be served; answered
  with an ``error`` message, and the connection stays open.
"""

from __future__ import annotations

from typing import Any


class WsServerError(Exception):
    """Root of every error wsserver raises on purpose."""


class ConfigError(WsServerError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# --- before the upgrade: HTTP answers -------------------------------------


class Rejection(WsServerError):
    """A handshake refused with an HTTP status before the upgrade."""

    status = 400
    #: Label for ``wsserver_rejections_total{reason}``.
    reason = "bad_request"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadHandshake(Rejection):
    """An upgrade request RFC 6455 section 4.2.1 does not allow (HTTP/1.0, say)."""

    status = 400
    reason = "bad_handshake"


class OriginRejected(Rejection):
    status = 403
    reason = "origin"


class HandshakeRateLimited(Rejection):
    status = 429
    reason = "handshake_rate"


class ServerFull(Rejection):
    status = 503
    reason = "server_full"


class TooManyUnverified(ServerFull):
    """The pool of upgraded-but-refused connections is full (503, a reason of its own)."""

    reason = "unverified_full"


class TooManyFromAddress(Rejection):
    status = 429
    reason = "address_cap"


class NoToken(Rejection):
    status = 403
    reason = "no_token"


class Draining(Rejection):
    status = 503
    reason = "draining"


class BackendRefused(Rejection):
    """The connect proxy answered ``disconnect``: HTTP 403, with the backend's code."""

    status = 403
    reason = "backend_refused"

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        #: The backend's close code (4000-4999), passed on in the answer's body.
        self.code = code


class BackendUnavailable(Rejection):
    """The connect proxy failed, timed out or is at its concurrency bound: 503."""

    status = 503
    reason = "backend_unavailable"


class DependencyUnavailable(Rejection):
    """Something the handshake needs cannot be reached (the broker that keeps
    HTTP streaming's tickets): 503 with ``Retry-After``."""

    status = 503
    reason = "unavailable"


# --- after the upgrade: close codes ----------------------------------------


class CloseError(WsServerError):
    """Ends a WebSocket connection with ``code`` and a short ``reason``."""

    code = 1011
    default_reason = "internal error"
    #: What the server's log says beyond ``reason`` (never sent to the client).
    detail = ""

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason or self.default_reason
        super().__init__(self.reason)


class TokenInvalid(CloseError):
    """Token missing, malformed, wrongly signed, wrong claims (4001)."""

    code = 4001
    default_reason = "invalid token"


class TokenExpired(TokenInvalid):
    """Token past its ``exp`` (4001, its own reason so clients can tell)."""

    default_reason = "token expired"


class GoingAway(CloseError):
    """The server is shutting down (1001): reconnect after a short random delay."""

    code = 1001
    default_reason = "server shutting down"


class ServiceRestart(CloseError):
    """The server is restarting and closes its connections a few at a time
    (1012, ``--drain-rate``): reconnect with backoff and jitter, so the
    reconnects spread as the closes do."""

    code = 1012
    default_reason = "service restart"


class KeepaliveTimeout(CloseError):
    """The peer did not answer a keepalive ping in time (1011, as websockets does)."""

    code = 1011
    default_reason = "keepalive ping timeout"


class DisconnectedByServer(CloseError):
    """``/api/disconnect``: the application asked for this user to go (4003 by default)."""

    code = 4003
    default_reason = "disconnected by the server"

    def __init__(self, reason: str | None = None, code: int | None = None) -> None:
        super().__init__(reason)
        if code is not None:
            self.code = code


class TooManyForUser(CloseError):
    code = 4008
    default_reason = "too many connections for this user"


class SlowConsumer(CloseError):
    """The peer reads too slowly for its own replies, or reads nothing at all (4009).

    Room traffic never causes it: a member that falls behind a room lags
    (see :mod:`wsserver.hub`).
    """

    code = 4009
    default_reason = "slow consumer"

    def __init__(self, detail: str = "replies past the write bound", backlog: int = 0) -> None:
        super().__init__()
        self.detail = detail
        self.backlog = backlog


class RateLimitExceeded(CloseError):
    code = 4029
    default_reason = "kept sending while rate limited"


class PolicyViolation(CloseError):
    code = 1008
    default_reason = "policy violation"


# --- one message: error replies --------------------------------------------


class MessageError(WsServerError):
    """A client message that cannot be served: ``{"type": "error", ...}``."""

    code = "bad_request"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def as_reply(self) -> dict[str, Any]:
        """The ``error`` message for the client (without ``id``)."""
        reply: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        reply.update(self.extra)
        return reply


class BadRequest(MessageError):
    code = "bad_request"


class Forbidden(MessageError):
    """A join or publish (presence, history) that nothing grants; the connection stays open."""

    code = "forbidden"


class UnknownType(MessageError):
    code = "unknown_type"


class UnknownTask(MessageError):
    code = "unknown_task"


class RateLimited(MessageError):
    code = "rate_limited"

    def __init__(self, retry_after: float, message: str = "message rate exceeded") -> None:
        super().__init__(message, retry_after=round(retry_after, 3))
        self.retry_after = retry_after


class RoomFull(MessageError):
    """A join into a room at ``--max-room-members`` on this node."""

    code = "room_full"


class Busy(MessageError):
    code = "busy"


class TaskTimeout(MessageError):
    code = "timeout"


class TaskCancelled(MessageError):
    """The task was ended because its connection closed; nobody gets the answer."""

    code = "cancelled"


class TaskFailed(MessageError):
    code = "task_failed"


class Unavailable(MessageError):
    """The broker cannot be reached right now; retry later."""

    code = "unavailable"

    def __init__(self, message: str = "the broker is unavailable; retry later",
                 retry_after: float = 2.0) -> None:
        super().__init__(message, retry_after=round(retry_after, 3))


class BackendError(MessageError):
    """The application's backend refused a join, publish or rpc, with its own code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class InternalError(MessageError):
    """A bug on our side while serving one message; the connection stays open."""

    code = "internal_error"
