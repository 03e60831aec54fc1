"""Wiring: the state every handler shares, and the Tornado application."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tornado.web

from wsserver import handlers
from wsserver.auth import TokenIssuer, TokenVerifier
from wsserver.config import Settings
from wsserver.logsafe import escape, redact
from wsserver.logthrottle import LogThrottle
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
connection_log = logging.getLogger("wsserver.connection")

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
    #: Refused handshakes logged per address (limit key) and minute.
    refusal_log: LogThrottle[str] = field(default_factory=LogThrottle)
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
            typ=settings.jwt_typ,
            max_lifetime=settings.max_token_lifetime,
            accept_demo=settings.demo,
        )
        issuer = None
        if settings.can_sign:
            issuer = TokenIssuer(
                key,
                settings.jwt_algorithms[0],
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                typ=settings.jwt_typ,
            )
        pool = TaskPool(
            load_task_table(settings.tasks_module),
            workers=settings.task_workers,
            queue=settings.task_queue,
            timeout=settings.task_timeout,
            tasks_module=settings.tasks_module,
            metrics=metrics,
            per_user=settings.task_per_user,
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
                settings.max_unverified_connections,
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
        self.metrics.connections_unverified.set(self.registry.unverified)
        self.metrics.rooms.set(len(self.rooms))

    def housekeeping(self) -> None:
        """Forget rate-limit buckets that have refilled (bounded memory)."""
        self.message_buckets.sweep()
        self.handshake_buckets.sweep()
        for address, count in self.refusal_log.sweep():
            connection_log.info("%d more handshake refusals from %s suppressed", count,
                                escape(address))
        self.refresh_gauges()


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log line with query-string tokens redacted."""
    if getattr(handler, "quiet_access_log", False):
        return  # a refused handshake logs its own (throttled) line
    status = handler.get_status()
    if status == 101:
        # The connection's own "open user=..." line says more.
        log_method = access_log.debug
    elif status < 400:
        log_method = access_log.info
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
        escape(redact(request.uri or "")),
        escape(client),
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
        **extra_settings,
    )
