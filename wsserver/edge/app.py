"""Wiring: the Tornado applications of the public and the internal listener."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import tornado.web

from wsserver.edge import api, handlers, sse
from wsserver.edge.fastpath import FrameLimits
from wsserver.logsafe import escape, redact
from wsserver.services import Services

access_log = logging.getLogger("wsserver.access")
connection_log = logging.getLogger("wsserver.connection")

def static_dir() -> Path:
    """The demo page's files: inside the installed package, or the checkout's ``static/``."""
    installed = Path(__file__).resolve().parent.parent / "static"
    if (installed / "index.html").is_file():
        return installed
    return Path(__file__).resolve().parent.parent.parent / "static"


#: Paths that probes and pages poll (load balancers, systemd, Prometheus, the demo
#: page's chart): one INFO line per poll would drown the log.
POLLED_PATHS = frozenset({"/healthz", "/readyz", "/stats", "/metrics"})


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log line with query-string tokens redacted.

    Successful probes and polls, and upgrades, are logged at DEBUG only; with
    ``--no-access-log`` every request below 500 is.
    """
    if getattr(handler, "quiet_access_log", False):
        return  # a refused handshake logs its own (throttled) line
    status = handler.get_status()
    quiet = not handler.application.settings.get("wsserver_access_log", True)
    if status == 101 or getattr(handler, "streamed", False):
        # The connection's own "open user=..." line says more.
        log_method = access_log.debug
    elif status < 400 and (quiet or handler.request.path in POLLED_PATHS):
        log_method = access_log.debug
    elif status < 400:
        log_method = access_log.info
    elif quiet and status < 500:
        log_method = access_log.debug
    elif status < 500:
        log_method = access_log.warning
    else:
        log_method = access_log.error
    request = handler.request
    access_line(log_method, status, request.method or "-", request.uri or "",
                getattr(handler, "client_address", None) or request.remote_ip or "",
                1000.0 * request.request_time())


def access_line(log_method: Callable[..., None], status: int, method: str, uri: str,
                client: str, duration_ms: float) -> None:
    """Write one access line (also the native upgrade path's, for its 101s)."""
    client = escape(client)
    uri = escape(redact(uri))
    log_method(
        "%d %s %s (%s) %.2fms", status, method, uri, client, duration_ms,
        # The line's fields for --log-format json (the text line has no key=value pairs).
        extra={"status": status, "method": method, "uri": uri, "addr": client,
               "duration_ms": round(duration_ms, 2)},
    )


Listener = Literal["public", "internal"]


def make_app(
    services: Services, listener: Listener = "public", **extra_settings: Any
) -> tornado.web.Application:
    """The Tornado application for one listener.

    Without ``--internal-port`` the public listener serves every route. With
    it, ``/metrics``, ``/stats`` and ``/api/`` move to the internal listener;
    ``/healthz`` and ``/readyz`` are on both.
    """
    static = str(static_dir())
    kwargs = {"services": services}
    split = services.settings.internal_port is not None
    probes: list[Any] = [
        (r"/healthz", handlers.HealthHandler, kwargs),
        (r"/readyz", handlers.ReadyHandler, kwargs),
    ]
    inside: list[Any] = [
        (r"/metrics", handlers.MetricsHandler, kwargs),
        (r"/stats", handlers.StatsHandler, kwargs),
        *((pattern, handler, kwargs) for pattern, handler in api.ROUTES),
    ]
    routes: list[Any]
    if listener == "internal":
        routes = [*probes, *inside]
    else:
        streams = {**kwargs, "streams": sse.Streams(services.broker)}
        routes = [
            (r"/", handlers.IndexHandler, {"path": static}),
            (r"/ws", handlers.WebSocketHandler,
             {**kwargs, "frame_limits": FrameLimits.from_settings(services.settings)}),
            (r"/sse", sse.StreamHandler, streams),
            (r"/sse/send", sse.SendHandler, streams),
            (r"/auth/ticket", sse.TicketHandler, kwargs),
            *probes,
            *([] if split else inside),
            (r"/auth/demo-token", handlers.DemoTokenHandler, kwargs),
            (r"/static/(.*)", handlers.StaticHandler, {"path": static}),
        ]
    settings = services.settings
    return tornado.web.Application(
        routes,
        log_function=log_request,
        # Keepalive is the server's own sweep (Services.keepalive), not a Task
        # per connection: Tornado's pinging stays off.
        websocket_ping_interval=None,
        websocket_max_message_size=settings.max_message_size,
        default_handler_class=handlers.NotFoundHandler,
        wsserver_access_log=settings.access_log,
        **extra_settings,
    )
