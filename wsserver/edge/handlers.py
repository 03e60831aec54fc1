"""The Tornado edge: requests and frames in, core calls, answers out.

With :mod:`wsserver.edge.api`, the only module where HTTP requests meet the core.
The handshake runs the contract's checks in the contract's order and
:meth:`WebSocketHandler._refuse` turns a :class:`~wsserver.errors.Rejection`
into its HTTP status; after the 101 a :class:`~wsserver.session.Session` holds
the connection's logic, on the frame layer (:mod:`wsserver.edge.fastpath`).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import time
import unicodedata
from types import TracebackType
from typing import Any

import tornado.web
from prometheus_client import Counter
from tornado.httputil import HTTPHeaders
from tornado.log import app_log, gen_log

from wsserver.edge.fastpath import FrameConnection, FrameLimits, UpgradeHandler
from wsserver.edge.refusal import refuse
from wsserver.errors import HandshakeRateLimited, Rejection
from wsserver.handshake import Answer, Refused, Upgraded, UpgradeRequest, decide, open_session
from wsserver.logsafe import escape, redact
from wsserver.metrics import CONTENT_TYPE_LATEST
from wsserver.netaddr import limit_key
from wsserver.services import Services

log = logging.getLogger("wsserver.connection")

#: Served with the demo page: scripts and styles only from this origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
MAX_DEMO_USER_LENGTH = 64
#: Shared by every upgraded connection once its handshake headers are dropped.
_NO_HEADERS = HTTPHeaders()


def _gone(connection: Any) -> bool:
    """True when the client of an HTTP/1 connection has closed it."""
    stream = getattr(connection, "stream", None)
    return stream is None or stream.closed()


def _client_address(services: Services, request: Any) -> str:
    headers = request.headers
    return services.proxies.client_address(
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
    method, uri = request.method or "-", request.uri or ""
    client = getattr(handler, "client_address", None) or request.remote_ip or ""
    if isinstance(value, tornado.web.HTTPError):
        message = value.get_message()
        if message:
            gen_log.warning("%d %s: %s", value.status_code, _summary(method, uri, client),
                            escape(message))
    else:
        log_uncaught(method, uri, client, value)


def log_uncaught(method: str, uri: str, client: str, error: BaseException | None) -> None:
    """The error line of an exception no handler caught, as Tornado's, with
    the URI redacted (also the native upgrade path's)."""
    app_log.error("Uncaught exception %s", _summary(method, uri, client), exc_info=error)


def _summary(method: str, uri: str, client: str) -> str:
    return f"{escape(method)} {escape(redact(uri))} ({escape(client)})"


class RedactedLogging(tornado.web.RequestHandler):
    """Tornado's exception logging, with the URI redacted (a mixin for every handler)."""

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        log_exception(self, typ, value, tb)


class BaseHandler(RedactedLogging):
    """JSON answers, security headers, and errors without tracebacks."""

    services: Services

    def initialize(self, services: Services) -> None:
        self.services = services
        self.client_address = _client_address(services, self.request)
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
        error = kwargs.get("exc_info", (None, None, None))[1]
        reason = error.reason if isinstance(error, tornado.web.HTTPError) else None
        self.write_json({"error": reason or http.client.responses.get(status_code, "Unknown")},
                        status_code)


class NotFoundHandler(BaseHandler):
    """Unknown paths: 404 with a JSON body."""

    def initialize(self, services: Services | None = None) -> None:
        pass

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


class HealthHandler(BaseHandler):
    """``GET /healthz``: 200 while the process runs.

    Readable by a page of an allowed origin (CORS), so that ``wsclient.js``
    can tell a server that is up from one that is away after a WebSocket
    failed before opening, on a page served from another origin too.
    """

    def get(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin and self.services.origins.allows(origin):
            self.set_header("Access-Control-Allow-Origin", origin)
            self.add_header("Vary", "Origin")
        self.write_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    """``GET /readyz``: 200 while accepting connections; 503 while draining or
    while the broker does not answer its probe."""

    def get(self) -> None:
        problem = self.services.ready
        if problem is None:
            self.write_json({"status": "ready"})
        else:
            self.write_json({"status": problem}, 503)


class MetricsHandler(BaseHandler):
    """``GET /metrics``: Prometheus text format."""

    def get(self) -> None:
        self.services.refresh_gauges()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.services.metrics.render())


class StatsHandler(BaseHandler):
    """``GET /stats``: a few live counts as JSON, for the demo page's chart
    (under ``--workers``, the sums over every worker)."""

    def get(self) -> None:
        services = self.services
        metrics = services.metrics
        if metrics.workers is not None:
            # Under --workers: every worker's counts, summed.
            totals = metrics.totals()
            self.write_json(
                {
                    "connections": int(totals["wsserver_connections"]),
                    "users": int(totals["wsserver_users"]),
                    "rooms": int(totals["wsserver_rooms"]),
                    "messages": int(totals.get("wsserver_messages", 0)),
                    "deliveries": int(totals.get("wsserver_deliveries", 0)),
                    "tasks_in_flight": int(totals["wsserver_task_queue_depth"]),
                    "uptime": round(time.time() - metrics.workers.started_at, 3),
                }
            )
            return
        self.write_json(
            {
                "connections": services.registry.authenticated,
                "users": services.registry.users,
                "rooms": len(services.hub),
                "messages": int(_total(metrics.messages)),
                "deliveries": int(_total(metrics.deliveries)),
                "tasks_in_flight": services.pool.in_flight,
                "uptime": round(time.time() - services.started_at, 3),
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
    """``POST /auth/demo-token``: a short-lived token for any name, demo mode only.

    ``GET`` answers whether it is on, so a page can ask without a 404 in the console.
    """

    def get(self) -> None:
        services = self.services
        enabled = services.settings.demo and services.issuer is not None
        self.write_json({"enabled": enabled, "expires_in": services.settings.demo_token_ttl
                         if enabled else None})

    def post(self) -> None:
        services = self.services
        if not services.settings.demo or services.issuer is None:
            raise tornado.web.HTTPError(404)
        try:
            services.origins.check(self.request.headers.get("Origin"))
            wait = services.handshake_buckets.take(self.limit_key)
            if wait:
                raise HandshakeRateLimited("too many token requests", retry_after=wait)
        except Rejection as rejection:
            services.metrics.rejections.labels(rejection.reason).inc()
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
        ttl = services.settings.demo_token_ttl
        token, _ = services.issuer.issue(user, ttl, demo=True)
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


class StaticHandler(RedactedLogging, tornado.web.StaticFileHandler):
    """The demo page's files, with a strict Content-Security-Policy."""

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # no version banner (see BaseHandler)
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")


class IndexHandler(StaticHandler):
    """``GET /``: the demo page."""

    async def get(self, path: str = "", include_body: bool = True) -> None:
        await super().get("index.html", include_body)




class WebSocketHandler(RedactedLogging, UpgradeHandler):
    """``GET /ws`` through Tornado's HTTP server: the handshake, then a
    :class:`~wsserver.session.Session`.

    TLS connections and any head the native path (:mod:`wsserver.edge.native`)
    leaves to Tornado come here. :func:`wsserver.handshake.decide` runs the
    checks in docs/protocol.md's order, as it does for the native path; after the
    101, :meth:`open` hands the connection to a Session
    (:func:`wsserver.handshake.open_session`), which answers the token's
    verdict (close 4001) and the per-user cap (close 4008) before anything the
    client sent is read.
    """

    services: Services

    def initialize(self, services: Services, frame_limits: FrameLimits) -> None:
        self.services = services
        self.limits = frame_limits
        self.client_address = _client_address(services, self.request)
        self.limit_key = limit_key(self.client_address)
        #: Past the checks, until open() takes it (its registry slot with it).
        self._upgraded: Upgraded | None = None
        #: Set for a refused handshake, whose own log line replaces the access line.
        self.quiet_access_log = False

    async def get(self, *args: Any, **kwargs: Any) -> None:
        request = self.request
        decision = await decide(
            self.services,
            UpgradeRequest(
                request.version, request.headers.get,
                lambda: self.get_query_argument("token", None),
                self.client_address, self.limit_key,
                lambda: request.connection is None or _gone(request.connection),
            ),
            compression=self.limits.compression,
        )
        if decision is None:
            return
        if isinstance(decision, Refused):
            refuse(self, self.services, decision.rejection, limit_key=self.limit_key,
                   client_address=self.client_address)
            return
        if isinstance(decision, Answer):
            self.answer(decision)
            return
        self._upgraded = decision
        try:
            await self.upgrade(decision.response, decision.deflate)
        finally:
            # Never opened (the client left during the 101): free the slot.
            if self._upgraded is not None:
                self.services.registry.release(self._upgraded.admitted.reservation)
                self._upgraded = None

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # no version banner (see BaseHandler)

    def check_origin(self, origin: str) -> bool:
        """Only the configured origins (exact match, see :mod:`wsserver.origin`).

        Browsers send ``Origin`` on every WebSocket handshake and apply no
        same-origin policy to WebSockets, so this list is what keeps other
        sites' pages from connecting with a visitor's credentials. The
        handshake (:func:`wsserver.handshake.decide`) checks it with the
        contract's other checks, answering 403 with a JSON body.
        """
        return self.services.origins.allows(origin)

    async def open(self, connection: FrameConnection) -> None:
        upgraded, self._upgraded = self._upgraded, None
        assert upgraded is not None
        self._release_handshake()
        await open_session(self.services, connection, upgraded)

    def _release_handshake(self) -> None:
        """Drop what only the handshake needed, instead of keeping it for the
        connection's lifetime: about 20 objects per connection, and the token
        that travelled in a header or the query string."""
        self.request.headers = _NO_HEADERS
        self.request.uri = redact(self.request.uri or "")
        self.request.arguments = {}
        self.request.query_arguments = {}
