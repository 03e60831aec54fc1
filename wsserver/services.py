"""Services: the composition root, everything one node shares, without Tornado.

Built once from :class:`~wsserver.config.Settings` (after binding, so the
demo mode's origins are final from the start) and handed to the edge, which
reaches the core only through it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from wsserver.access import RoomAccess
from wsserver.auth import TokenIssuer, TokenVerifier
from wsserver.backend import Backend
from wsserver.brokers import Broker, make_broker
from wsserver.brokers.base import NodeStats
from wsserver.config import Settings
from wsserver.hub import Hub
from wsserver.jwks import KeySet
from wsserver.logsafe import escape
from wsserver.logthrottle import LogThrottle
from wsserver.metrics import Metrics
from wsserver.monitor import Snapshot
from wsserver.netaddr import TrustedProxies
from wsserver.origin import OriginPolicy
from wsserver.outbound import HttpClient
from wsserver.pool import TaskPool
from wsserver.ratelimit import BucketTable
from wsserver.registry import ConnectionRegistry
from wsserver.tasks import load_task_table

if TYPE_CHECKING:
    from wsserver.session import Session

log = logging.getLogger("wsserver.services")
refusal_log = logging.getLogger("wsserver.connection")


def default_node_name() -> str:
    """``host:pid``: unique per process, readable in logs and ``/api/nodes``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Services:
    """Everything the sessions, the hub and the edge share on one node."""

    def __init__(
        self,
        settings: Settings,
        *,
        port: int | None = None,
        metrics: Metrics | None = None,
        broker: Broker | None = None,
        http: HttpClient | None = None,
    ) -> None:
        """``http``: the outbound HTTP client (the edge's), needed with a proxy
        URL or a JWKS URL."""
        self.settings = settings
        self.metrics = metrics = metrics or Metrics()
        self.started_at = time.time()
        self.draining = False
        if http is None and (settings.proxy_urls or settings.jwt_jwks_url):
            raise ValueError("the proxies and --jwt-jwks-url need an HTTP client")
        self.http = http
        #: Keys from --jwt-jwks-url, by kid; None with a key (or no key at all).
        self.key_set: KeySet | None = None
        if settings.jwt_jwks_url and http is not None:
            self.key_set = KeySet(
                settings.jwt_jwks_url, http, metrics, algorithms=settings.jwt_algorithms,
                refresh_min=settings.jwks_refresh_min,
            )
        # None with a JWKS URL, or with a connect proxy and no key: then no
        # static key verifies tokens.
        key = settings.verify_key.reveal() if settings.verify_key is not None else None
        self.verifier = TokenVerifier(
            key,
            settings.jwt_algorithms,
            key_set=self.key_set,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway,
            typ=settings.jwt_typ,
            max_lifetime=settings.max_token_lifetime,
            accept_demo=settings.demo,
        )
        self.issuer: TokenIssuer | None = None
        if settings.can_sign and key is not None:
            self.issuer = TokenIssuer(
                key,
                settings.jwt_algorithms[0],
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                typ=settings.jwt_typ,
            )
        origins = settings.allowed_origins
        if settings.default_origins:
            origins = settings.loopback_origins(port if port is not None else settings.port)
        self.origins = OriginPolicy(origins)
        self.proxies = TrustedProxies(settings.trusted_proxies)
        self.registry: ConnectionRegistry[Session] = ConnectionRegistry(
            settings.max_connections,
            settings.max_connections_per_ip,
            settings.max_connections_per_user,
            settings.max_unverified_connections,
        )
        #: Refused handshakes logged per address (limit key) and minute.
        self.refusal_log: LogThrottle[str] = LogThrottle()
        #: Requests Tornado could not parse, logged per address and minute.
        self.malformed_log: LogThrottle[str] = LogThrottle()
        self.message_buckets: BucketTable[str] = BucketTable(
            settings.message_rate, settings.message_burst
        )
        self.handshake_buckets: BucketTable[str] = BucketTable(
            settings.handshake_rate, settings.handshake_burst
        )
        self.pool = TaskPool(
            load_task_table(settings.tasks_module),
            workers=settings.task_workers,
            queue=settings.task_queue,
            timeout=settings.task_timeout,
            tasks_module=settings.tasks_module,
            metrics=metrics,
            per_user=settings.task_per_user,
        )
        node_name = settings.node_name or default_node_name()
        self.broker = broker or make_broker(
            settings.broker, node_name, metrics=metrics,
            probe_interval=settings.broker_probe_interval,
            heartbeat_interval=settings.broker_heartbeat, node_ttl=settings.broker_node_ttl,
        )
        #: The application's backend (the proxies), when any proxy URL is set.
        self.backend: Backend | None = None
        if settings.proxy_urls and http is not None:
            self.backend = Backend(
                settings.proxy_urls, http, metrics, key=settings.proxy_key,
                timeout=settings.proxy_timeout, max_concurrency=settings.proxy_max_concurrency,
                header_names=settings.proxy_headers,
            )
        self.hub = Hub(
            self.broker,
            settings.rooms,
            metrics,
            RoomAccess(settings.rooms, self.verifier, metrics, self.backend),
            node_stats=self.node_stats,
            sessions_of=self.registry.connections_of,
            spawn=self.spawn,
            max_recovery=settings.max_recovery,
            max_recovery_bytes=settings.max_recovery_bytes,
            max_room_members=settings.max_room_members,
            room_publish_rate=settings.room_publish_rate,
            room_publish_burst=settings.room_publish_burst,
            room_publish_bytes=settings.room_publish_bytes,
        )
        #: Futures of background work, held so the loop's weak references suffice.
        self.background: set[asyncio.Future[Any]] = set()

    @property
    def node_name(self) -> str:
        return self.broker.node_name

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start the task pool, connect the broker, fetch the key set (if any)."""
        self.pool.start()
        await self.broker.start(self.hub)
        if self.key_set is not None:
            # A failure is logged and /readyz says so; the server serves anyway
            # (connect proxies, and the keys once the provider answers).
            await self.key_set.refresh()

    async def close(self) -> None:
        """Disconnect the broker, stop the task workers, close the HTTP client."""
        try:
            await self.broker.close()
        finally:
            self.pool.shutdown()
            await self.close_http()

    async def close_http(self) -> None:
        """Stop the key set's fetch and close the outbound HTTP client's connections."""
        if self.key_set is not None:
            await self.key_set.close()
        if self.http is not None:
            await self.http.close()

    @property
    def ready(self) -> str | None:
        """None when ready; else why not (``draining``, ``broker_unavailable``)."""
        if self.draining:
            return "draining"
        if not self.broker.up:
            return "broker_unavailable"
        if self.key_set is not None and not self.key_set.ready:
            # Never fetched: no token can be verified. Once fetched, an
            # unreachable URL keeps the last good keys and readiness.
            return "jwks_unavailable"
        return None

    # --- background work -------------------------------------------------------

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run ``coroutine`` in the background, holding it until done."""
        future = asyncio.ensure_future(coroutine)
        self.background.add(future)
        future.add_done_callback(self.background.discard)

    async def quietly(self, awaitable: Awaitable[Any]) -> None:
        """Await a clean-up whose failure is only worth a log line."""
        try:
            await awaitable
        except Exception as exc:
            log.warning("broker clean-up failed: %s", exc)

    # --- shared per-user buckets -------------------------------------------------

    def share_bucket(self, user: str, total: int) -> None:
        """Give this node its share of ``user``'s message bucket.

        With connections on several nodes, each node's local bucket gets the
        fraction of the rate and burst that its connections are of the user's
        total; :meth:`rebalance_buckets` refreshes the shares in one batch per
        interval, so no broker round trip is made per message.
        """
        local = self.registry.count_for_user(user)
        if total <= local or self.broker.kind == "memory":
            self.message_buckets.set_share(user, 1.0)
        else:
            self.message_buckets.set_share(user, local / total)

    async def rebalance_buckets(self) -> None:
        """Refresh every local user's bucket share from the cluster's counts."""
        if self.broker.kind == "memory":
            return
        users = self.registry.user_names()
        if not users:
            return
        try:
            totals = await self.broker.user_connections(users)
        except Exception as exc:
            log.debug("cannot rebalance message buckets: %s", exc)
            return
        for user in users:
            self.share_bucket(user, totals.get(user, 0))

    # --- what the monitor, the metrics and the API read ------------------------

    def node_stats(self) -> NodeStats:
        return NodeStats(
            connections=self.registry.authenticated,
            users=self.registry.users,
            uptime=round(time.time() - self.started_at, 3),
        )

    def sessions(self) -> Sequence[Session]:
        return list(self.registry)

    def snapshot(self) -> Snapshot:
        """The counts the monitor logs."""
        return Snapshot(
            connections=self.registry.total,
            users=self.registry.users,
            rooms=len(self.hub),
            tasks_in_flight=self.pool.in_flight,
            max_connections=self.settings.max_connections,
        )

    def keepalive(self) -> None:
        """One sweep over every connection: keepalive pings, and peers that read nothing."""
        settings = self.settings
        interval = settings.ping_interval
        stall = settings.slow_consumer_timeout
        now = time.monotonic()
        for session in self.registry:
            if interval:
                session.keepalive(now, interval)
            if stall:
                session.check_stalled(now, stall)

    def refresh_gauges(self) -> None:
        """Set the gauges that are read off the registry, the hub and the broker."""
        self.metrics.users.set(self.registry.users)
        self.metrics.connections_unverified.set(self.registry.unverified)
        self.metrics.rooms.set(len(self.hub))
        self.metrics.broker_up.set(1 if self.broker.up else 0)

    def housekeeping(self) -> None:
        """Forget refilled buckets and stale state (bounded memory)."""
        self.message_buckets.sweep()
        self.handshake_buckets.sweep()
        for address, count in self.refusal_log.sweep():
            refusal_log.info("%d more handshake refusals from %s suppressed", count,
                             escape(address))
        for address, count in self.malformed_log.sweep():
            refusal_log.info("%d more malformed requests from %s suppressed", count,
                             escape(address))
        self.hub.sweep()
        sweep = getattr(self.broker, "sweep", None)
        if sweep is not None:
            sweep()
        self.refresh_gauges()
