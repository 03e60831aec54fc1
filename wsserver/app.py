"""Wiring: the state every handler shares, and the Tornado application."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tornado.web

from wsserver import handlers
from wsserver.auth import TokenIssuer, TokenVerifier
from wsserver.config import Settings
from wsserver.metrics import Metrics
from wsserver.monitor import Snapshot
from wsserver.netaddr import TrustedProxies
from wsserver.origin import OriginPolicy
from wsserver.pool import TaskPool
from wsserver.ratelimit import BucketTable
from wsserver.registry import ConnectionRegistry, RoomTable
from wsserver.tasks import load_task_table

if TYPE_CHECKING:
    from wsserver.handlers import WebSocketHandler

access_log = logging.getLogger("wsserver.access")

_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&#]*", re.IGNORECASE)


def static_dir() -> Path:
    """The demo page's files: inside the installed package, or the checkout's ``static/``."""
    installed = Path(__file__).resolve().parent / "static"
    if (installed / "index.html").is_file():
        return installed
    return Path(__file__).resolve().parent.parent / "static"


@dataclass
class ServerState:
    """Everything the handlers share, built once from :class:`Settings`."""

    settings: Settings
    metrics: Metrics
    verifier: TokenVerifier
    issuer: TokenIssuer | None
    origins: OriginPolicy
    proxies: TrustedProxies
    registry: ConnectionRegistry[WebSocketHandler]
    rooms: RoomTable[WebSocketHandler]
    message_buckets: BucketTable[str]
    handshake_buckets: BucketTable[str]
    pool: TaskPool
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    #: Futures of tasks in flight, held so the loop's weak references suffice.
    background: set[asyncio.Future[None]] = field(default_factory=set)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> ServerState:
        """Build every shared part; the task pool is created but not started."""
        metrics = metrics or Metrics()
        assert settings.verify_key is not None
        key = settings.verify_key.reveal()
        verifier = TokenVerifier(
            key,
            settings.jwt_algorithms,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway,
        )
        issuer = None
        if settings.can_sign:
            issuer = TokenIssuer(
                key,
                settings.jwt_algorithms[0],
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
            )
        pool = TaskPool(
            load_task_table(settings.tasks_module),
            workers=settings.task_workers,
            queue=settings.task_queue,
            timeout=settings.task_timeout,
            tasks_module=settings.tasks_module,
            metrics=metrics,
        )
        return cls(
            settings=settings,
            metrics=metrics,
            verifier=verifier,
            issuer=issuer,
            origins=OriginPolicy(settings.allowed_origins),
            proxies=TrustedProxies(settings.trusted_proxies),
            registry=ConnectionRegistry(
                settings.max_connections,
                settings.max_connections_per_ip,
                settings.max_connections_per_user,
            ),
            rooms=RoomTable(),
            message_buckets=BucketTable(settings.message_rate, settings.message_burst),
            handshake_buckets=BucketTable(settings.handshake_rate, settings.handshake_burst),
            pool=pool,
        )

    def snapshot(self) -> Snapshot:
        """The counts the monitor logs."""
        return Snapshot(
            connections=self.registry.total,
            users=self.registry.users,
            rooms=len(self.rooms),
            tasks_in_flight=self.pool.in_flight,
            max_connections=self.settings.max_connections,
        )

    def keepalive(self) -> None:
        """One keepalive sweep over every connection."""
        interval = self.settings.ping_interval
        now = time.monotonic()
        for connection in self.registry:
            connection.keepalive(now, interval)

    def refresh_gauges(self) -> None:
        """Set the gauges that are read off the registry and the rooms."""
        self.metrics.users.set(self.registry.users)
        self.metrics.rooms.set(len(self.rooms))

    def housekeeping(self) -> None:
        """Forget rate-limit buckets that have refilled (bounded memory)."""
        self.message_buckets.sweep()
        self.handshake_buckets.sweep()
        self.refresh_gauges()


def redact(uri: str) -> str:
    """``uri`` with any ``token`` query parameter replaced by ``[redacted]``."""
    return _TOKEN_IN_QUERY.sub(r"\1[redacted]", uri)


#: Paths that probes and pages poll (load balancers, systemd, Prometheus, the demo
#: page's chart): one INFO line per poll would drown the log.
POLLED_PATHS = frozenset({"/healthz", "/readyz", "/stats", "/metrics"})


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log line with query-string tokens redacted.

    Successful probes and polls, and upgrades, are logged at DEBUG only; with
    ``--no-access-log`` every request below 500 is.
    """
    status = handler.get_status()
    quiet = not handler.application.settings.get("wsserver_access_log", True)
    if status == 101:
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
    client = getattr(handler, "client_address", None) or request.remote_ip
    log_method(
        "%d %s %s (%s) %.2fms",
        status,
        request.method,
        redact(request.uri or ""),
        client,
        1000.0 * request.request_time(),
    )


def make_app(state: ServerState, **extra_settings: Any) -> tornado.web.Application:
    """The Tornado application with every route of the contract."""
    static = str(static_dir())
    kwargs = {"state": state}
    routes: list[Any] = [
        (r"/", handlers.IndexHandler, {"path": static}),
        (r"/ws", handlers.WebSocketHandler, kwargs),
        (r"/healthz", handlers.HealthHandler, kwargs),
        (r"/readyz", handlers.ReadyHandler, kwargs),
        (r"/metrics", handlers.MetricsHandler, kwargs),
        (r"/stats", handlers.StatsHandler, kwargs),
        (r"/auth/demo-token", handlers.DemoTokenHandler, kwargs),
        (r"/static/(.*)", handlers.StaticHandler, {"path": static}),
    ]
    settings = state.settings
    return tornado.web.Application(
        routes,
        log_function=log_request,
        # Keepalive is the server's own sweep (Server.keepalive), not a Task
        # per connection: Tornado's pinging stays off.
        websocket_ping_interval=None,
        websocket_max_message_size=settings.max_message_size,
        default_handler_class=handlers.NotFoundHandler,
        wsserver_access_log=settings.access_log,
        **extra_settings,
    )
