"""The server API: the application's backend publishes, disconnects, looks inside.

On only when an API key is configured; otherwise every ``/api/`` path answers
404, as if it did not exist. Every request carries the key
(``Authorization: apikey KEY`` or ``X-API-Key: KEY``), compared in constant
time. Errors map in one place (:meth:`ApiHandler.write_error`): malformed
input 400, a missing or wrong key 401, a body over ``--max-message-size`` 413,
an epoch mismatch 409, a broker that cannot be reached 503 with
``Retry-After``. Every request is counted in
``wsserver_api_requests_total{endpoint, outcome}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from types import TracebackType
from typing import Any

import tornado.web
from tornado.http1connection import HTTP1Connection

from wsserver import protocol
from wsserver.brokers.base import BrokerUnavailable, PublishResult
from wsserver.digits import parse_digits
from wsserver.edge.handlers import RedactedLogging
from wsserver.errors import BadRequest, WsServerError
from wsserver.hub import history_spec
from wsserver.rooms import validate_room
from wsserver.services import Services

log = logging.getLogger("wsserver.api")

MAX_BROADCAST_ROOMS = 1000
MAX_IDEMPOTENCY_KEY = protocol.MAX_IDEMPOTENCY_KEY
MAX_HISTORY_LIMIT = 10_000
MAX_REASON_BYTES = 123  # a close frame's payload is at most 125 bytes (RFC 6455 5.5)
#: A declared body length past 18 digits is over any limit anyway.
MAX_LENGTH_DIGITS = 18


class ApiError(WsServerError):
    """An API request answered with ``status`` and ``{"error": code, "message"}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@tornado.web.stream_request_body
class ApiHandler(RedactedLogging):
    """Key check, JSON bodies, and the one mapping from errors to statuses.

    The body streams in (:meth:`data_received`), so that :meth:`prepare` sees
    the declared size before the body is read: a body over
    ``--max-message-size`` is answered 413 whatever the listener's own cap.
    """

    endpoint = "unknown"

    def initialize(self, services: Services) -> None:
        self.services = services
        self._outcome = "ok"
        self._body = bytearray()

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # no version banner
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "application/json")

    def prepare(self) -> None:
        limit = self.services.settings.max_message_size
        length = self._declared_length()
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            # After an early answer Tornado reads on until the connection
            # closes: its cap must not cut in with a second answer (a bare 400).
            connection.set_max_body_size(max(limit, length or 0))
        key = self.services.settings.api_key
        if key is None:
            raise tornado.web.HTTPError(404)
        if not hmac.compare_digest(self._presented_key().encode(), key.reveal().encode()):
            self._outcome = "unauthorized"
            raise ApiError(401, "unauthorized", "missing or wrong API key: send "
                           "'Authorization: apikey <KEY>' or 'X-API-Key: <KEY>'")
        if length is None:
            raise ApiError(400, "bad_request", "Content-Length must be ASCII digits")
        if length > limit:
            raise ApiError(413, "too_large", f"body over {limit} bytes")

    def _declared_length(self) -> int | None:
        """The request's Content-Length (0 when absent), or None when it is not
        a number (Tornado's own check, which answers 400, comes after prepare)."""
        declared = self.request.headers.get("Content-Length")
        if declared is None:
            return 0
        try:
            return parse_digits(declared.strip(), max_digits=MAX_LENGTH_DIGITS)
        except ValueError:
            return None

    def data_received(self, chunk: bytes) -> None:
        # At most --max-message-size: prepare() set the connection's cap.
        self._body += chunk

    def _presented_key(self) -> str:
        header = self.request.headers.get("Authorization", "")
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "apikey" and value.strip():
            return value.strip()
        return self.request.headers.get("X-API-Key", "").strip()

    def body(self) -> dict[str, Any]:
        """The request's JSON object, or :class:`ApiError` 400/413."""
        raw = bytes(self._body)
        if len(raw) > self.services.settings.max_message_size:
            raise ApiError(413, "too_large",
                           f"body over {self.services.settings.max_message_size} bytes")
        try:
            value = protocol.decode(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "bad_request", "body is not UTF-8") from None
        except BadRequest as error:
            raise ApiError(400, "bad_request", error.message) from None
        if not isinstance(value, dict):
            raise ApiError(400, "bad_request", "body must be a JSON object")
        return value

    def room_arg(self, value: Any, name: str = "room") -> str:
        if not isinstance(value, str):
            raise ApiError(400, "bad_request", f"'{name}' must be a string")
        try:
            return validate_room(value)
        except BadRequest as error:
            raise ApiError(400, "bad_request", error.message) from None

    def answer(self, body: dict[str, Any], status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(body, separators=(",", ":")))

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The errors write_error() answers are the client's, not the server's.
        if isinstance(value, ApiError | BrokerUnavailable | tornado.web.HTTPError):
            return
        log.error("API %s failed: %s", self.endpoint, type(value).__name__, exc_info=value)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The one mapping from an error to its answer (Tornado calls it for
        every exception a handler raises, after :meth:`log_exception`)."""
        e = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(e, ApiError):
            self._answer_error(e.status, e.code, e.message)
        elif isinstance(e, BrokerUnavailable):
            self.set_header("Retry-After", str(max(1, math.ceil(e.retry_after))))
            self._answer_error(503, "unavailable", e.message)
        elif isinstance(e, tornado.web.HTTPError) and e.status_code == 404:
            self._outcome = "not_found"
            self.set_status(404)
            self.finish(json.dumps({"error": "not_found"}))
        elif isinstance(e, tornado.web.HTTPError) and e.status_code == 405:
            allowed = [m for m in ("GET", "POST") if m.lower() in type(self).__dict__]
            self.set_header("Allow", ", ".join(allowed))
            self._answer_error(405, "method_not_allowed",
                               f"{self.request.method} is not allowed here; use "
                               f"{' or '.join(allowed) or 'nothing'}")
        else:
            self._answer_error(500, "internal_error", "internal error")

    def _answer_error(self, status: int, code: str, message: str) -> None:
        if self._outcome == "ok":
            self._outcome = code
        self.answer({"error": code, "message": message}, status)

    def on_finish(self) -> None:
        if self.services.settings.api_key is not None:
            self.services.metrics.api_requests.labels(self.endpoint, self._outcome).inc()


def _idempotency_key(body: dict[str, Any]) -> str | None:
    key = body.get("idempotency_key")
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ApiError(400, "bad_request",
                       f"'idempotency_key' must be a string of 1 to {MAX_IDEMPOTENCY_KEY} "
                       "characters")
    return key


class PublishHandler(ApiHandler):
    """``POST /api/publish {"room", "data"[, "idempotency_key"]}``."""

    endpoint = "publish"

    async def post(self) -> None:
        body = self.body()
        room = self.room_arg(body.get("room"))
        if "data" not in body:
            raise ApiError(400, "bad_request", "'data' is required")
        result = await self.services.hub.publish(
            room, body["data"], idempotency_key=_idempotency_key(body)
        )
        self.answer(result.as_dict())


class BroadcastHandler(ApiHandler):
    """``POST /api/broadcast {"rooms": [...], "data"}``: one publish per room."""

    endpoint = "broadcast"

    async def post(self) -> None:
        body = self.body()
        rooms = body.get("rooms")
        if not isinstance(rooms, list) or not 1 <= len(rooms) <= MAX_BROADCAST_ROOMS:
            raise ApiError(400, "bad_request",
                           f"'rooms' must be a list of 1 to {MAX_BROADCAST_ROOMS} room names")
        names = [self.room_arg(room, "rooms[]") for room in rooms]
        if "data" not in body:
            raise ApiError(400, "bad_request", "'data' is required")
        key = _idempotency_key(body)
        hub = self.services.hub
        outcomes = await asyncio.gather(
            *(hub.publish(room, body["data"], idempotency_key=key) for room in names),
            return_exceptions=True,
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures and len(failures) == len(outcomes):
            raise failures[0]
        results: list[dict[str, Any]] = []
        for outcome in outcomes:
            if isinstance(outcome, PublishResult):
                results.append(outcome.as_dict())
            elif isinstance(outcome, BrokerUnavailable):
                results.append({"error": "unavailable"})
            else:
                log.error("broadcast publish failed: %r", outcome)
                results.append({"error": "internal_error"})
        self.answer({"results": results})


class DisconnectHandler(ApiHandler):
    """``POST /api/disconnect {"user"[, "code", "reason"]}`` on every node."""

    endpoint = "disconnect"

    async def post(self) -> None:
        body = self.body()
        user = body.get("user")
        if not isinstance(user, str) or not user:
            raise ApiError(400, "bad_request", "'user' must be a non-empty string")
        code = body.get("code", 4003)
        if isinstance(code, bool) or not isinstance(code, int) or not 4000 <= code <= 4999:
            raise ApiError(400, "bad_request", "'code' must be an integer from 4000 to 4999")
        reason = body.get("reason", "disconnected by the server")
        if not isinstance(reason, str) or len(reason.encode("utf-8")) > MAX_REASON_BYTES:
            raise ApiError(400, "bad_request",
                           f"'reason' must be a string of at most {MAX_REASON_BYTES} bytes")
        await self.services.broker.disconnect_user(user, code, reason)
        self.answer({})


class RoomsHandler(ApiHandler):
    """``GET /api/rooms``: rooms with members on every node."""

    endpoint = "rooms"

    async def get(self) -> None:
        rooms = await self.services.broker.rooms()
        self.answer({"rooms": {
            room: {"connections": count.connections, "users": count.users}
            for room, count in sorted(rooms.items())
        }})


class PresenceHandler(ApiHandler):
    """``GET /api/presence?room=R`` (namespaces with ``presence = true``)."""

    endpoint = "presence"

    async def get(self) -> None:
        room = self.room_arg(self.get_query_argument("room", None))
        if not self.services.settings.rooms.policy_for(room).presence:
            raise ApiError(400, "bad_request", f"presence is not enabled for {room!r}")
        presence = await self.services.broker.presence(room)
        self.answer({"room": room, "users": presence.users,
                     "connections": presence.connections})


class HistoryHandler(ApiHandler):
    """``GET /api/history?room=R[&since=O&epoch=E][&limit=N]`` (rooms with history)."""

    endpoint = "history"

    async def get(self) -> None:
        room = self.room_arg(self.get_query_argument("room", None))
        spec = history_spec(self.services.settings.rooms.policy_for(room))
        if spec is None:
            raise ApiError(400, "bad_request", f"{room!r} keeps no history")
        since = self._int_arg("since", 0)
        limit = self._int_arg("limit", min(spec.size, MAX_HISTORY_LIMIT))
        if not 1 <= limit <= MAX_HISTORY_LIMIT:
            raise ApiError(400, "bad_request", f"'limit' must be 1 to {MAX_HISTORY_LIMIT}")
        epoch = self.get_query_argument("epoch", None)
        page = await self.services.broker.history(room, spec, since=since, limit=limit)
        if epoch is not None and epoch != page.epoch:
            raise ApiError(409, "epoch", f"epoch {epoch!r} is not the room's epoch "
                           f"{page.epoch!r}: its history was lost; reload")
        self.answer({
            "epoch": page.epoch,
            "offset": page.offset,
            "complete": page.complete,
            "messages": [json.loads(p.payload) for p in page.publications],
        })

    def _int_arg(self, name: str, default: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            return parse_digits(raw)
        except ValueError:
            raise ApiError(400, "bad_request",
                           f"'{name}' must be a whole number, 0 or more, in ASCII digits "
                           "(at most 18)") from None


class NodesHandler(ApiHandler):
    """``GET /api/nodes``: the nodes sharing the broker."""

    endpoint = "nodes"

    async def get(self) -> None:
        nodes = await self.services.broker.nodes()
        self.answer({"nodes": [
            {"name": n.name, "connections": n.connections, "users": n.users,
             "uptime": n.uptime}
            for n in nodes
        ]})


class UnknownApiHandler(ApiHandler):
    """Any other ``/api/`` path: 404 (after the key check, so it leaks nothing)."""

    endpoint = "unknown"

    def prepare(self) -> None:
        super().prepare()
        raise tornado.web.HTTPError(404)


ROUTES: list[tuple[str, type[ApiHandler]]] = [
    (r"/api/publish", PublishHandler),
    (r"/api/broadcast", BroadcastHandler),
    (r"/api/disconnect", DisconnectHandler),
    (r"/api/rooms", RoomsHandler),
    (r"/api/presence", PresenceHandler),
    (r"/api/history", HistoryHandler),
    (r"/api/nodes", NodesHandler),
    (r"/api/.*", UnknownApiHandler),
]
