"""The Tornado edge: requests and frames in, core calls, answers out.

This is the only module where HTTP statuses, frames and close codes meet the
core. The handshake runs the contract's checks in the contract's order, and
two methods turn the core's errors into answers: :meth:`WebSocketHandler._refuse`
(a :class:`~wsserver.errors.Rejection` → HTTP status) and
:meth:`WebSocketHandler._end` (a :class:`~wsserver.errors.CloseError` → close
code).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
import unicodedata
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import tornado.web
import tornado.websocket
from prometheus_client import Counter
from tornado.httputil import HTTPHeaders
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream
from tornado.log import app_log, gen_log

from wsserver import frames, protocol
from wsserver.auth import Credentials, Identity, extract_token
from wsserver.errors import (
    BadHandshake,
    BadRequest,
    Busy,
    CloseError,
    Draining,
    GoingAway,
    HandshakeRateLimited,
    InternalError,
    KeepaliveTimeout,
    MessageError,
    NoToken,
    PolicyViolation,
    RateLimited,
    RateLimitExceeded,
    Rejection,
    SlowConsumer,
    TaskFailed,
    TokenExpired,
    TokenInvalid,
)
from wsserver.logsafe import escape, redact
from wsserver.metrics import CONTENT_TYPE_LATEST
from wsserver.netaddr import limit_key
from wsserver.protocol import ClientMessage, MessageId
from wsserver.tasks import Task
from wsserver.tornado_internals import (
    ServerProtocol13,
    disconnect_after_response,
    pending_bytes,
    websocket_params,
)

if TYPE_CHECKING:
    from wsserver.app import ServerState

log = logging.getLogger("wsserver.connection")

#: Served with the demo page: scripts and styles only from this origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
MAX_DEMO_USER_LENGTH = 64
#: Shared by every upgraded connection once its handshake headers are dropped.
_NO_HEADERS = HTTPHeaders()


def _client_address(state: ServerState, request: Any) -> str:
    headers = request.headers
    return state.proxies.client_address(
        request.remote_ip or "", headers.get("X-Forwarded-For"), headers.get("X-Real-IP")
    )


def log_exception(
    handler: tornado.web.RequestHandler,
    typ: type[BaseException] | None,
    value: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """Tornado's ``RequestHandler.log_exception``, with the URI redacted and escaped.

    Tornado's own version logs ``self._request_summary()`` and
    ``repr(self.request)``, both with the raw URI: a token sent as
    ``?token=`` would be written to the error log.
    """
    request = handler.request
    summary = "{} {} ({})".format(
        escape(request.method or "-"), escape(redact(request.uri or "")),
        escape(getattr(handler, "client_address", None) or request.remote_ip),
    )
    if isinstance(value, tornado.web.HTTPError):
        message = value.get_message()
        if message:
            gen_log.warning("%d %s: %s", value.status_code, summary, escape(message))
    else:
        app_log.error("Uncaught exception %s", summary, exc_info=value)


class BaseHandler(tornado.web.RequestHandler):
    """JSON answers, security headers, and errors without tracebacks."""

    state: ServerState

    def initialize(self, state: ServerState) -> None:
        self.state = state
        self.client_address = _client_address(state, self.request)
        self.limit_key = limit_key(self.client_address)

    def set_default_headers(self) -> None:
        # Tornado's "Server: TornadoServer/<version>" tells an attacker which
        # version's bugs to try.
        self.clear_header("Server")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")

    def write_json(self, body: dict[str, Any], status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.write_json({"error": self._reason}, status_code)

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        log_exception(self, typ, value, tb)


class NotFoundHandler(BaseHandler):
    """Unknown paths: 404 with a JSON body."""

    def initialize(self, state: ServerState | None = None) -> None:
        pass

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


class HealthHandler(BaseHandler):
    """``GET /healthz``: 200 while the process runs."""

    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    """``GET /readyz``: 200 while accepting connections, 503 while draining."""

    def get(self) -> None:
        if self.state.draining:
            self.write_json({"status": "draining"}, 503)
        else:
            self.write_json({"status": "ready"})


class MetricsHandler(BaseHandler):
    """``GET /metrics``: Prometheus text format."""

    def get(self) -> None:
        self.state.refresh_gauges()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.state.metrics.render())


class StatsHandler(BaseHandler):
    """``GET /stats``: a few live counts as JSON, for the demo page's chart."""

    def get(self) -> None:
        state = self.state
        metrics = state.metrics
        self.write_json(
            {
                "connections": state.registry.authenticated,
                "users": state.registry.users,
                "rooms": len(state.rooms),
                "messages": int(_total(metrics.messages)),
                "deliveries": int(_total(metrics.deliveries)),
                "tasks_in_flight": state.pool.in_flight,
                "uptime": round(time.time() - state.started_at, 3),
            }
        )


def _total(counter: Counter) -> float:
    """A counter's value summed over all its labels."""
    return sum(
        sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


class DemoTokenHandler(BaseHandler):
    """``POST /auth/demo-token``: a short-lived token for any name, demo mode only."""

    def post(self) -> None:
        state = self.state
        if not state.settings.demo or state.issuer is None:
            raise tornado.web.HTTPError(404)
        try:
            state.origins.check(self.request.headers.get("Origin"))
            wait = state.handshake_buckets.take(self.limit_key)
            if wait:
                raise HandshakeRateLimited("too many token requests", retry_after=wait)
        except Rejection as rejection:
            state.metrics.rejections.labels(rejection.reason).inc()
            if rejection.retry_after is not None:
                self.set_header("Retry-After", str(math.ceil(rejection.retry_after)))
            self.write_json({"error": rejection.reason, "message": rejection.message},
                            rejection.status)
            return
        user = self._requested_user()
        if user is None:
            self.write_json(
                {"error": "bad_request",
                 "message": f'send {{"user": NAME}}, NAME of 1 to {MAX_DEMO_USER_LENGTH} '
                            "printable characters"},
                400,
            )
            return
        ttl = state.settings.demo_token_ttl
        token, _ = state.issuer.issue(user, ttl, demo=True)
        self.write_json({"token": token, "expires_in": ttl})

    def _requested_user(self) -> str | None:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            return None
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(user, str):
            return None
        user = user.strip()
        if not 1 <= len(user) <= MAX_DEMO_USER_LENGTH:
            return None
        if any(unicodedata.category(ch).startswith("C") for ch in user):
            return None
        return user


class StaticHandler(tornado.web.StaticFileHandler):
    """The demo page's files, with a strict Content-Security-Policy."""

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # no version banner (see BaseHandler)
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        log_exception(self, typ, value, tb)


class IndexHandler(StaticHandler):
    """``GET /``: the demo page."""

    async def get(self, path: str = "", include_body: bool = True) -> None:
        await super().get("index.html", include_body)


Dispatch = Callable[["WebSocketHandler", ClientMessage], None]


class WebSocketHandler(tornado.websocket.WebSocketHandler):
    """``GET /ws``: one authenticated connection.

    Lifecycle: :meth:`get` runs the pre-upgrade checks; :meth:`open` verifies
    the token (close 4001) and the per-user cap (close 4008) before anything
    the client sent is read; :meth:`on_message` handles one text frame;
    :meth:`on_close` forgets the connection everywhere.
    """

    state: ServerState

    def initialize(self, state: ServerState) -> None:
        self.state = state
        self.client_address = _client_address(state, self.request)
        self.limit_key = limit_key(self.client_address)
        self.identity: Identity | None = None
        self._credentials: Credentials | None = None
        #: The token's verification, done before the upgrade so that a bad
        #: token is counted in the registry's unverified pool from the start.
        self._verdict: Identity | CloseError | None = None
        #: Set for a refused handshake, whose own log line replaces the access line.
        self.quiet_access_log = False
        self._opened_at: float | None = None
        self._ended_with: CloseError | None = None
        # One pending timer at a time: token_expiring, then the expiry close.
        self._timer: object | None = None
        # Keepalive, driven by the server-wide sweep (see keepalive()).
        self._next_ping = 0.0
        self._pong_due: float | None = None
        self._strikes = 0
        # Strikes are forgiven only after a full refill's time without a
        # refusal: a token trickling back between refusals must not wipe them.
        self._strike_memory = state.settings.message_burst / state.settings.message_rate
        self._last_refused = -math.inf
        self._tasks_in_flight = 0
        self._max_write_buffer = state.settings.max_write_buffer
        self._protocol: ServerProtocol13 | None = None
        #: The socket under a plain-TCP stream, for direct sends (never under TLS).
        self._plain_socket: socket.socket | None = None

    # --- the handshake, in CONTRACT.md's order ---------------------------

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            await super().get(*args, **kwargs)  # Tornado answers 400 / 426
            return
        try:
            if self.request.version == "HTTP/1.0":
                # RFC 6455 section 4.2.1: "an HTTP/1.1 or higher GET request".
                raise BadHandshake("a WebSocket upgrade needs HTTP/1.1 or higher")
            self._credentials = self._admit()
        except Rejection as rejection:
            self._refuse(rejection)
            return
        await super().get(*args, **kwargs)

    def _admit(self) -> Credentials:
        """The checks before the upgrade; each raises its :class:`Rejection`."""
        state = self.state
        address = self.limit_key
        if state.draining:
            raise Draining("server shutting down", retry_after=5)
        state.origins.check(self.request.headers.get("Origin"))
        wait = state.handshake_buckets.take(address)
        if wait:
            raise HandshakeRateLimited("too many handshakes from this address", retry_after=wait)
        credentials = extract_token(
            self.request.headers.get("Authorization"),
            self._offered_subprotocols(),
            self.get_query_argument("token", None),
        )
        if credentials is not None:
            try:
                self._verdict = state.verifier.verify(credentials.token)
            except CloseError as error:  # answered with its close code after the upgrade
                self._verdict = error
        state.registry.check_admission(address, verified=not isinstance(self._verdict, CloseError))
        if credentials is None:
            raise NoToken(
                "no token: send 'Authorization: Bearer <jwt>', the subprotocols "
                "'bearer, <jwt>', or ?token=<jwt>"
            )
        return credentials

    def _refuse(self, rejection: Rejection) -> None:
        """Answer a refused handshake with its HTTP status, then close the HTTP
        connection: handshakes pipelined behind it are never read, so one TCP
        connection gets at most one refusal.

        Every refusal is counted; only the first few per address and interval
        are logged (:class:`~wsserver.logthrottle.LogThrottle`), then one line
        says how many more were suppressed.
        """
        state = self.state
        state.metrics.rejections.labels(rejection.reason).inc()
        logged, earlier = state.refusal_log.allow(self.limit_key)
        if earlier:
            log.info("%d more handshake refusals from %s suppressed", earlier,
                     escape(self.limit_key))
        if logged:
            log.info(
                "handshake refused: %s (%d) addr=%s", escape(rejection.message),
                rejection.status, escape(self.client_address),
            )
        # The line above (or its summary) stands for the access log line.
        self.quiet_access_log = True
        disconnect_after_response(self.request)
        self.set_status(rejection.status)
        if rejection.retry_after is not None:
            self.set_header("Retry-After", str(max(1, math.ceil(rejection.retry_after))))
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps({"error": rejection.reason, "message": rejection.message}))

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        log_exception(self, typ, value, tb)

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # no version banner (see BaseHandler)

    def _offered_subprotocols(self) -> list[str]:
        header = self.request.headers.get("Sec-WebSocket-Protocol", "")
        return [name.strip() for name in header.split(",") if name.strip()]

    def check_origin(self, origin: str) -> bool:
        """Only the configured origins (exact match, see :mod:`wsserver.origin`).

        Browsers send ``Origin`` on every WebSocket handshake and apply no
        same-origin policy to WebSockets, so this list is what keeps other
        sites' pages from connecting with a visitor's credentials. It has
        already run in :meth:`_admit`; Tornado asks again in ``get()``.
        """
        return self.state.origins.allows(origin)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        """Select ``bearer`` when the token came that way; never echo the token."""
        if self._credentials is not None and self._credentials.source == "subprotocol":
            return "bearer"
        return None

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        if self.request.headers.get("Sec-WebSocket-Version") != "13":
            return None
        self._protocol = ServerProtocol13(self, False, websocket_params(self))
        return self._protocol

    def get_compression_options(self) -> dict[str, Any] | None:
        # Frames are built once per broadcast; compression would make them per-peer.
        return None

    def open(self, *args: str, **kwargs: str) -> None:
        state = self.state
        self._opened_at = time.monotonic()
        credentials, self._credentials = self._credentials, None
        verdict, self._verdict = self._verdict, None
        assert credentials is not None and verdict is not None
        state.registry.admit(self, self.limit_key, verified=isinstance(verdict, Identity))
        try:
            if isinstance(verdict, CloseError):
                raise verdict
            identity = verdict
            state.registry.authenticate(self, identity.user)
        except CloseError as error:
            state.registry.demote(self)
            self._end(error)
            return
        self.identity = identity
        self.set_nodelay(True)
        stream = self._protocol.stream if self._protocol is not None else None
        if type(stream) is IOStream:  # exactly: an SSLIOStream must encrypt
            self._plain_socket = stream.socket
        state.metrics.connections.inc()
        state.metrics.connections_accepted.inc()
        log.info("open user=%s addr=%s via=%s", escape(identity.user),
                 escape(self.client_address), credentials.source)
        settings = state.settings
        self.send(
            {
                "type": "welcome",
                "user": identity.user,
                "expires_at": int(identity.expires_at),
                "limits": {
                    "message_rate": settings.message_rate,
                    "message_burst": settings.message_burst,
                    "max_message_size": settings.max_message_size,
                    "tasks_in_flight": settings.task_per_connection,
                    "tasks_per_user": settings.task_per_user,
                    "connections_per_user": settings.max_connections_per_user,
                },
            }
        )
        self._next_ping = time.monotonic() + settings.ping_interval
        self._schedule_expiry()
        self._release_handshake()

    def _release_handshake(self) -> None:
        """Drop what only the handshake needed, instead of keeping it for the
        connection's lifetime: about 20 objects per connection, and the token
        that travelled in a header or the query string."""
        self.request.headers = _NO_HEADERS
        self.request.uri = redact(self.request.uri or "")
        self.request.arguments = {}
        self.request.query_arguments = {}
        self._headers = _NO_HEADERS

    # --- messages ----------------------------------------------------------

    def on_message(self, message: str | bytes) -> None:
        identity = self.identity
        if identity is None or self._ended_with is not None:
            # Not authenticated, or already closing: frames pipelined behind
            # the handshake of a rejected token are dropped unread.
            return
        if isinstance(message, bytes):
            self._end(PolicyViolation("binary frames are not accepted"))
            return
        wait = self.state.message_buckets.take(identity.user)
        if wait:
            self._on_rate_limited(message, wait)
            return
        if self._strikes and time.monotonic() - self._last_refused >= self._strike_memory:
            self._strikes = 0
        try:
            msg = protocol.parse(message)
        except MessageError as error:
            self.state.metrics.messages.labels("invalid").inc()
            self._reply_error(error, protocol.salvage_id(message))
            return
        self.state.metrics.messages.labels(msg.type).inc()
        try:
            self._DISPATCH[msg.type](self, msg)
        except MessageError as error:
            self._reply_error(error, msg.id)
        except CloseError as error:
            self._end(error)
        except Exception:
            log.exception("error serving %s for user=%s", msg.type, escape(identity.user))
            self._reply_error(InternalError("internal error; the connection stays open"),
                              msg.id)

    def _on_rate_limited(self, message: str, wait: float) -> None:
        self._strikes += 1
        self._last_refused = time.monotonic()
        self.state.metrics.rejections.labels("rate_limited").inc()
        if self._strikes > self.state.settings.rate_limit_strikes:
            self._end(RateLimitExceeded())
            return
        self._reply_error(RateLimited(wait), protocol.salvage_id(message))

    def _on_ping(self, msg: ClientMessage) -> None:
        self._reply(msg, {"type": "pong"})

    def _on_echo(self, msg: ClientMessage) -> None:
        self._reply(msg, {"type": "echo", "data": msg.field("data")})

    def _on_join(self, msg: ClientMessage) -> None:
        room = msg.field("room")
        try:
            self.state.rooms.join(self, room)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        self._reply(msg, {"type": "joined", "room": room})

    def _on_leave(self, msg: ClientMessage) -> None:
        room = msg.field("room")
        self.state.rooms.leave(self, room)
        self._reply(msg, {"type": "left", "room": room})

    def _on_publish(self, msg: ClientMessage) -> None:
        assert self.identity is not None
        room = msg.field("room")
        rooms = self.state.rooms
        if not rooms.is_member(self, room):
            raise BadRequest(f"join room {room!r} before publishing to it")
        message = {"type": "message", "room": room, "from": self.identity.user,
                   "data": msg.field("data")}
        # One encoding and one frame for every member; only the sender's copy
        # differs when it carries the message's id.
        frame = frames.text_frame(protocol.encode(message))
        delivered = 0
        for member in rooms.members(room):
            if member is self and msg.id is not None:
                continue
            delivered += member.send_frame(frame)
        if msg.id is not None:
            delivered += self._reply(msg, message)
        self.state.metrics.deliveries.inc(delivered)

    def _on_task(self, msg: ClientMessage) -> None:
        # Validated first, so unknown names and bad arguments are answered as
        # such even at the limit, and only known names become metric labels.
        task, kwargs = self.state.pool.prepare(msg.field("name"), msg.body.get("args", {}))
        limit = self.state.settings.task_per_connection
        if self._tasks_in_flight >= limit:
            self.state.metrics.tasks.labels(task.name, "busy").inc()
            raise Busy(f"at most {limit} tasks in flight on one connection")
        self._tasks_in_flight += 1
        # The loop keeps only weak references to tasks: hold this one until done.
        background = self.state.background
        future = asyncio.ensure_future(self._run_task(msg, task, kwargs))
        background.add(future)
        future.add_done_callback(background.discard)

    async def _run_task(self, msg: ClientMessage, task: Task, kwargs: dict[str, Any]) -> None:
        try:
            conn = self.ws_connection
            if conn is None or conn.is_closing():
                # Closed before this coroutine first ran: on_close has already
                # cancelled this connection's tasks, and would miss this one.
                return
            # The user's share and fair turn; this connection owns it (on_close cancels).
            value = await self.state.pool.execute(task, kwargs, user=self._user, owner=self)
        except MessageError as error:
            self._reply_error(error, msg.id)
        except Exception:
            log.exception("task %s failed for user=%s", task.name, escape(self._user))
            self._reply_error(TaskFailed("the task failed"), msg.id)
        else:
            self._reply(msg, {"type": "result", "name": task.name, "value": value})
        finally:
            self._tasks_in_flight -= 1

    def _on_refresh(self, msg: ClientMessage) -> None:
        assert self.identity is not None
        identity = self.state.verifier.verify(msg.field("token"))  # CloseError → 4001
        if identity.user != self.identity.user:
            raise TokenInvalid("invalid token: issued for another user")
        self.identity = identity
        self._schedule_expiry()
        self._reply(msg, {"type": "refreshed", "expires_at": int(identity.expires_at)})

    _DISPATCH: dict[str, Dispatch] = {
        "ping": _on_ping,
        "echo": _on_echo,
        "join": _on_join,
        "leave": _on_leave,
        "publish": _on_publish,
        "task": _on_task,
        "refresh": _on_refresh,
    }

    # --- live tokens ---------------------------------------------------------

    def _schedule_expiry(self) -> None:
        """``token_expiring`` before ``exp``, then close 4001 at ``exp`` (+ leeway)."""
        assert self.identity is not None
        self._cancel_timer()
        remaining = self.identity.expires_at - time.time()
        warning = min(self.state.settings.token_warning, max(remaining, 0.0) / 2)
        self._timer = IOLoop.current().call_later(max(0.0, remaining - warning),
                                                  self._warn_expiring)

    def _warn_expiring(self) -> None:
        if self.identity is None:
            return
        self.send({"type": "token_expiring", "expires_at": int(self.identity.expires_at)})
        close_in = self.identity.expires_at + self.state.settings.jwt_leeway - time.time()
        self._timer = IOLoop.current().call_later(max(0.0, close_in), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._end(TokenExpired())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            IOLoop.current().remove_timeout(self._timer)
            self._timer = None

    # --- keepalive -------------------------------------------------------------

    def keepalive(self, now: float, interval: float) -> None:
        """Ping when due; drop the peer when its last ping went unanswered.

        The server calls this for every connection from one periodic sweep,
        instead of Tornado's ping Task per connection: the same protocol, a
        fraction of the objects per connection.
        """
        if self.identity is None or self._ended_with is not None:
            return
        if self._pong_due is not None:
            if now >= self._pong_due:
                self._drop(KeepaliveTimeout())
            return
        if now >= self._next_ping:
            self._next_ping = now + interval
            self._pong_due = now + interval
            self.send_frame(frames.PING)

    def on_pong(self, data: bytes) -> None:
        self._pong_due = None

    # --- sending ---------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> bool:
        """Send one JSON message; False when the connection cannot take it.

        A message that cannot be encoded (a task returning NaN, say) is
        answered ``internal_error`` instead: a bad reply never aborts the
        connection.
        """
        try:
            payload = protocol.encode(message)
        except (ValueError, TypeError) as exc:
            log.error("cannot encode a %s reply for user=%s: %s",
                      escape(message.get("type")), escape(self._user), type(exc).__name__)
            error = InternalError("internal error: the reply could not be encoded").as_reply()
            if isinstance(message.get("id"), str | int | float):
                error["id"] = message["id"]
            try:
                payload = protocol.encode(error)
            except (ValueError, TypeError):
                payload = protocol.encode(InternalError("internal error").as_reply())
        return self.send_frame(frames.text_frame(payload))

    def send_frame(self, frame: bytes) -> bool:
        """Write a pre-built frame straight to the stream.

        This skips ``write_message``'s per-call JSON encoding and asyncio Task
        (see TORNADO-NOTES.md). Write futures from ``IOStream.write`` are
        already silenced by Tornado when the stream closes. A peer whose unsent
        data would pass ``--max-write-buffer`` is closed as a slow consumer, so
        its backlog never grows past that bound and a broadcast never waits.
        """
        conn = self.ws_connection
        if conn is None or conn.server_terminated or conn.client_terminated:
            return False
        stream = conn.stream
        if stream is None or stream.closed():
            return False
        pending = pending_bytes(stream)
        if pending + len(frame) > self._max_write_buffer:
            self._end(SlowConsumer())
            return False
        sock = self._plain_socket
        if not pending and sock is not None:
            # Nothing queued: hand the frame to the kernel ourselves, as
            # IOStream would, minus its Future and buffer bookkeeping (about
            # 10 us per write). What the kernel does not take, and any error,
            # goes through IOStream.write, which queues it or closes the stream.
            try:
                sent = sock.send(frame)
            except OSError:
                sent = 0
            if sent == len(frame):
                return True
            frame = frame[sent:]
        stream.write(frame)
        return True

    def _reply(self, msg: ClientMessage, reply: dict[str, Any]) -> bool:
        if msg.id is not None:
            reply["id"] = msg.id
        return self.send(reply)

    def _reply_error(self, error: MessageError, msg_id: MessageId | None) -> None:
        reply = error.as_reply()
        if msg_id is not None:
            reply["id"] = msg_id
        self.send(reply)

    # --- closing ---------------------------------------------------------------

    def _end(self, error: CloseError) -> None:
        """Close with ``error``'s code and reason (the one place that does)."""
        if self._ended_with is not None:
            return
        self._ended_with = error
        if isinstance(error, SlowConsumer):
            self.state.metrics.slow_consumers.inc()
            log.warning("slow consumer user=%s addr=%s: over %d bytes unsent; closing 4009",
                        escape(self._user), escape(self.client_address),
                        self._max_write_buffer)
        self.close(error.code, error.reason)

    def _drop(self, error: CloseError) -> None:
        """Close with ``error`` and cut the socket now: the peer is not listening."""
        self._end(error)
        protocol = self._protocol
        if protocol is not None and protocol.stream is not None:
            protocol.stream.close()

    def shut_down(self) -> None:
        """Close with 1001 because the server stops."""
        self._end(GoingAway())

    @property
    def _user(self) -> str:
        return self.identity.user if self.identity is not None else "-"

    def on_close(self) -> None:
        if self._opened_at is None:
            return  # never upgraded: nothing was registered
        state = self.state
        self._cancel_timer()
        # Nobody will read the answers: free the workers for others.
        state.pool.cancel_owner(self)
        state.rooms.leave_all(self)
        last_of_user = state.registry.remove(self)
        if last_of_user is not None:
            state.message_buckets.discard(last_of_user)
        if self.identity is not None:
            state.metrics.connections.dec()
        sent = self._protocol.sent_close if self._protocol is not None else None
        if self._ended_with is not None:
            code, reason, by = self._ended_with.code, self._ended_with.reason, "server"
        elif sent is not None:
            code, reason, by = sent[0], sent[1], "server"
        else:
            code, reason, by = self.close_code or 1006, self.close_reason or "", "client"
        state.metrics.closes.labels(str(code)).inc()
        if self.identity is None:
            # Refused after the upgrade (4001, 4008): as cheap to repeat as a
            # refused handshake, so logged through the same throttle.
            logged, earlier = state.refusal_log.allow(self.limit_key)
            if earlier:
                log.info("%d more handshake refusals from %s suppressed", earlier,
                         escape(self.limit_key))
            if not logged:
                return
        detail = self._ended_with.detail if self._ended_with is not None else ""
        log.info(
            "close user=%s addr=%s code=%d by=%s reason=%r%s duration=%.3fs",
            escape(self._user), escape(self.client_address), code, by, reason,
            f" detail={detail!r}" if detail else "",
            time.monotonic() - self._opened_at,
        )
