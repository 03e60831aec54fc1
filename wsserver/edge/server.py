"""Start-up and graceful shutdown of one wsserver process.

Start: bind, start the task pool and the monitor, then tell systemd READY=1.
Stop (SIGTERM or SIGINT): /readyz turns 503, the listener closes, every
connection gets 1001 (or, with ``--drain-rate``, 1012 a few at a time), the
drain waits up to ``--drain-timeout`` for them to go, then the pool's workers
are stopped and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from wsserver import loops
from wsserver.auth import DEMO_AUDIENCE
from wsserver.config import Settings
from wsserver.edge.app import make_app
from wsserver.edge.fastpath import FrameLimits
from wsserver.edge.listener import Listener
from wsserver.edge.malformed import MalformedRequestLog
from wsserver.edge.native import NativeUpgrades
from wsserver.errors import ConfigError, ServiceRestart
from wsserver.metrics import Metrics
from wsserver.monitor import ConnectionMonitor
from wsserver.outbound import HttpClient, display_url
from wsserver.sdnotify import SystemdNotifier
from wsserver.services import Services

log = logging.getLogger("wsserver.server")

MAX_BODY_SIZE = 64 * 1024
#: Descriptors beyond the connections: listeners, the task pool, logs, HTTP requests.
FILE_LIMIT_HEADROOM = 256
LISTEN_BACKLOG = 1024
#: Seconds between refreshes of the per-user bucket shares across nodes.
BUCKET_REBALANCE = 1.0
#: Seconds between refreshes of a worker's gauges, which other workers' scrapes read.
WORKER_GAUGES_REFRESH = 1.0
#: Seconds between two batches of a paced drain (--drain-rate).
DRAIN_TICK = 0.05
#: A paced drain asks every connection still open this long before
#: --drain-timeout (a quarter of it when shorter) to close at once, leaving
#: them time for the close handshake.
DRAIN_RUSH = 1.0


def make_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for ``wss://``, or None without ``--certfile``.

    Raises:
        ConfigError: the certificate or key cannot be loaded.
    """
    if not settings.certfile or not settings.keyfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.certfile, settings.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"--certfile/--keyfile: cannot load the pair: {exc}"]) from None
    return context


def public_listener(
    services: Services, ssl_context: ssl.SSLContext | None, *, native: bool = True
) -> Listener:
    """The public listener: every route, ``--header-timeout`` and
    ``--max-header-size`` on every request head; plain-TCP WebSocket upgrades
    answered at accept time (:mod:`wsserver.edge.native`) unless ``native``
    is False (TLS ones go through Tornado)."""
    settings = services.settings
    upgrades = None
    if native and ssl_context is None:
        upgrades = NativeUpgrades(services, FrameLimits.from_settings(settings),
                                  header_timeout=settings.header_timeout,
                                  max_header_size=settings.max_header_size)
    return Listener(
        make_app(services),
        native=upgrades,
        ssl_options=ssl_context,
        # Both bound how long a client may take to send its request, which
        # cuts off slowloris connections that trickle headers.
        idle_connection_timeout=settings.header_timeout,
        body_timeout=settings.header_timeout,
        max_header_size=settings.max_header_size,
        max_body_size=MAX_BODY_SIZE,
    )


@dataclass
class BoundSockets:
    """The listening sockets, bound once (by the supervisor for every worker)."""

    public: list[socket.socket]
    internal: list[socket.socket]

    @property
    def port(self) -> int:
        return int(self.public[0].getsockname()[1])

    @property
    def internal_port(self) -> int | None:
        return int(self.internal[0].getsockname()[1]) if self.internal else None


def bind(settings: Settings) -> BoundSockets:
    """Bind the public listener and, with ``--internal-port``, the internal one."""
    public = bind_sockets(settings.port, settings.host, backlog=LISTEN_BACKLOG)
    internal: list[socket.socket] = []
    if settings.internal_port is not None:
        try:
            internal = bind_sockets(settings.internal_port, settings.internal_host,
                                    backlog=LISTEN_BACKLOG)
        except OSError:
            for sock in public:
                sock.close()
            raise
    return BoundSockets(public, internal)


class Server:
    """One wsserver: an HTTP server, its shared state and its background jobs.

    Args:
        bound: sockets bound already (a worker of ``--workers``); else
            :meth:`start` binds them.
        worker: this process's number under the supervisor, or None alone.
        on_ready: called once serving (the supervisor's readiness pipe).
        metrics: the metrics to use (a worker's, written to shared files).
        heartbeat: ``(beat, seconds)``: call ``beat`` from the event loop
            every ``seconds`` (a worker proving to the supervisor that its
            loop runs).
    """

    def __init__(
        self,
        settings: Settings,
        notifier: SystemdNotifier | None = None,
        *,
        bound: BoundSockets | None = None,
        worker: int | None = None,
        on_ready: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
        heartbeat: tuple[Callable[[], None], float] | None = None,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._heartbeat = heartbeat
        self.services: Services | None = None
        self._bound = bound
        self.worker = worker
        self._on_ready = on_ready
        if notifier is None:
            notifier = SystemdNotifier.from_environ(os.environ)
            # As sd_notify(unset_environment=1): the task workers must not
            # inherit the socket and speak for the service.
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        self.notifier = notifier
        self.http_server: Listener | None = None
        self.internal_server: Listener | None = None
        self.port = settings.port
        self.internal_port: int | None = None
        self._jobs: list[PeriodicCallback] = []
        self._malformed_log: MalformedRequestLog | None = None
        self._stop_requested: asyncio.Event | None = None

    async def start(self) -> None:
        """Bind, start the pool and the monitor, announce READY=1."""
        settings = self.settings
        file_limit = _raise_file_limit()
        if file_limit < settings.max_connections + FILE_LIMIT_HEADROOM:
            # Past the limit, accept() fails with EMFILE over and over.
            log.warning(
                "open file limit %d is too low for --max-connections %d; raise LimitNOFILE "
                "(systemd) or ulimit -n to at least %d", file_limit, settings.max_connections,
                settings.max_connections + FILE_LIMIT_HEADROOM,
            )
        ssl_context = make_ssl_context(settings)
        bound = self._bound or bind(settings)
        sockets, internal_sockets = bound.public, bound.internal
        self.port = bound.port
        self.internal_port = bound.internal_port
        # Built after binding, so demo mode's origins carry the real port.
        services = self.services = Services(
            settings, port=self.port, metrics=self._metrics, http=_http_client(settings)
        )
        await services.start()
        self._malformed_log = MalformedRequestLog(services)
        self._malformed_log.install()
        self.http_server = public_listener(services, ssl_context)
        self.http_server.add_sockets(sockets)
        if internal_sockets:
            self.internal_server = Listener(
                make_app(services, "internal"),
                idle_connection_timeout=settings.header_timeout,
                body_timeout=settings.header_timeout,
                max_header_size=settings.max_header_size,
                max_body_size=MAX_BODY_SIZE,
            )
            self.internal_server.add_sockets(internal_sockets)

        monitor = ConnectionMonitor(services.snapshot, services.housekeeping)
        self._jobs.append(
            PeriodicCallback(lambda: _discard(monitor.check()), settings.monitor_interval * 1000)
        )
        periods = [p for p in (settings.ping_interval, settings.slow_consumer_timeout) if p]
        if periods:
            # Each connection is pinged (and checked for reading nothing) within a
            # tenth of the interval of its due time.
            self._jobs.append(PeriodicCallback(services.keepalive, min(periods) * 100))
        if services.metrics.workers is not None:
            # A scrape on another worker reads these from the shared files.
            self._jobs.append(
                PeriodicCallback(services.refresh_gauges, WORKER_GAUGES_REFRESH * 1000)
            )
        if services.broker.kind != "memory":
            self._jobs.append(PeriodicCallback(
                lambda: services.spawn(services.rebalance_buckets()), BUCKET_REBALANCE * 1000
            ))
        key_set = services.key_set
        if key_set is not None:
            # Fetches only when no set is held yet, or the held one is old.
            self._jobs.append(
                PeriodicCallback(key_set.refresh_if_stale, settings.jwks_refresh_min * 1000)
            )
        if self._heartbeat is not None:
            beat, every = self._heartbeat
            self._jobs.append(PeriodicCallback(beat, every * 1000))
        interval = self.notifier.watchdog_interval
        if interval:
            notifier = self.notifier
            self._jobs.append(
                PeriodicCallback(lambda: _discard(notifier.watchdog()), interval * 1000)
            )
        for job in self._jobs:
            job.start()

        if settings.demo_mode:
            log.warning(
                "DEMO MODE: no JWT key is configured. Tokens are signed with an ephemeral "
                "secret, the server listens on loopback only, and POST /auth/demo-token "
                "hands anyone a token for any name. Configure --jwt-secret-file or "
                "--jwt-public-key-file for real use."
            )
        elif settings.demo:
            log.warning(
                "DEMO ENDPOINT ON BESIDE A CONFIGURED KEY: POST /auth/demo-token signs a "
                "token for any name with the configured key, for anyone who reaches it. "
                "Demo tokens carry aud=%r (not this server's audience or issuer) and live "
                "at most %d s. Turn --demo off for production.",
                DEMO_AUDIENCE, settings.demo_token_ttl,
            )
        # As check-config prints it: demo mode opens the default namespace.
        source = "from the config file" if settings.rooms_from_file else (
            "demo mode" if settings.demo_mode else "defaults"
        )
        log.info("rooms (%s): %s", source, settings.rooms.describe())
        if services.origins.allowed:
            log.info("allowed origins: %s", ", ".join(sorted(services.origins.allowed)))
        else:
            # Browsers always send Origin: every page would be refused with 403, which
            # a page only sees as "1006 connection lost".
            log.warning(
                "allowed origins: none. No browser page can connect (403 before the "
                "upgrade; browsers report 1006); only clients that send no Origin can. "
                "Give --allowed-origins https://app.example.com (see docs/client.md)"
            )
        log.info("broker: %s, node %s, event loop: %s", services.broker.kind,
                 services.node_name, loops.describe(asyncio.get_running_loop()))
        if self.internal_port is not None:
            log.info("internal listener (metrics, stats, API) on http://%s:%d/",
                     _display_host(settings.internal_host), self.internal_port)
        if settings.api_key is None:
            log.info("server API off (no --api-key): /api/ answers 404")
        _log_backend(settings)
        _tune_gc()
        if self.worker is None:
            log.info("listening on %s://%s:%d/", settings.scheme, _display_host(settings.host),
                     self.port)
        else:
            log.info("worker %d serving (pid %d)", self.worker, os.getpid())
        self.notifier.ready()
        self.notifier.status(f"serving on port {self.port}")
        if self._on_ready is not None:
            self._on_ready()

    def request_stop(self) -> None:
        """Ask :meth:`serve` to shut down (signal handlers call this)."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        try:
            await self.start()
        except BaseException:
            if self.http_server is None:
                # Failed before listening (the bind, the TLS pair): nothing to drain,
                # and no "shutting down... stopped" in front of the real error.
                if self.services is not None:
                    await self.services.close()
            else:
                await self.shutdown()
            raise
        try:
            await self._stop_requested.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, close every connection (1001, or 1012 at --drain-rate),
        drain, stop the pool."""
        services = self.services
        if services is None or services.draining:
            self.notifier.close()
            return
        services.draining = True
        services.metrics.draining.set(1)
        self.notifier.stopping()
        open_now = services.registry.total
        deadline = time.monotonic() + self.settings.drain_timeout
        rate = self.settings.drain_rate
        if rate is not None and self.worker is not None:
            # Every worker drains at once: together they keep the machine's pace.
            rate /= self.settings.workers
        if rate is None:
            log.info("shutting down: closing %d connection(s) with 1001", open_now)
        else:
            log.info("shutting down: closing %d connection(s) with 1012 at %g per second",
                     open_now, rate)
        if self.http_server is not None:
            self.http_server.stop()
        if rate is None:
            for session in services.sessions():
                session.shut_down()
        else:
            await self._close_paced(rate, deadline)
        while services.registry.total and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if services.registry.total:
            log.warning("drain timeout: dropping %d connection(s)", services.registry.total)
            for session in services.sessions():
                session.transport.abort()
                session.on_closed(1006, "drain timeout", True)
        for job in self._jobs:
            job.stop()
        for listener in (self.http_server, self.internal_server):
            if listener is not None:
                listener.stop()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener.close_all_connections(), 1.0)
        await services.close()
        if self._malformed_log is not None:
            self._malformed_log.remove()
        self.notifier.close()
        log.info("stopped")


    async def _close_paced(self, rate: float, deadline: float) -> None:
        """Close the connections with 1012, ``rate`` per second, in the order they
        came; those still open shortly before ``deadline`` all at once."""
        assert self.services is not None
        queue = list(self.services.sessions())
        rush_at = deadline - min(DRAIN_RUSH, self.settings.drain_timeout / 4)
        start = time.monotonic()
        asked = 0
        while asked < len(queue):
            now = time.monotonic()
            due = len(queue) if now >= rush_at else min(len(queue), int((now - start) * rate) + 1)
            if now >= rush_at and due > asked:
                log.info("drain: closing the last %d connection(s) at once before the "
                         "--drain-timeout", due - asked)
            for session in queue[asked:due]:
                session.end(ServiceRestart())
            asked = due
            if asked < len(queue):
                await asyncio.sleep(max(0.0, min(DRAIN_TICK, rush_at - now)))


#: Young-generation threshold and the two older ones (CPython's: 700, 10, 10).
GC_THRESHOLDS = (20_000, 20, 20)


def _tune_gc() -> None:
    """A collector for a heap of many long-lived connections.

    Every full collection walks every object of every open connection (about
    80 each), and CPython's defaults start one every 70,000 net allocations:
    a burst of connects paid for several full walks of the whole heap. With
    these thresholds a full collection needs 8 million, while young cycles are
    still collected young. ``gc.freeze()`` moves the start-up heap (modules,
    settings) out of every collection for good.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _raise_file_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (one descriptor per connection);
    the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _http_client(settings: Settings) -> HttpClient | None:
    """The outbound HTTP client, when a proxy or a JWKS URL needs one."""
    if not settings.proxy_urls and not settings.jwt_jwks_url:
        return None
    from wsserver.edge.httpclient import AiohttpClient

    return AiohttpClient()


def _log_backend(settings: Settings) -> None:
    """Start-up lines for the proxies and the key set (URLs without credentials)."""
    urls = settings.proxy_urls
    if urls:
        log.info("backend proxies: %s; timeout %gs, at most %d in flight per kind",
                 ", ".join(f"{kind} {display_url(url)}" for kind, url in urls.items()),
                 settings.proxy_timeout, settings.proxy_max_concurrency)
        if settings.proxy_key is None:
            log.warning("backend proxies without --proxy-key-file: the backend cannot tell "
                        "this server's calls (X-Wsserver-Proxy-Key) from anyone else's")
    if settings.verify_key is None and not settings.jwt_jwks_url:
        log.info("no JWT key: connections authenticate through the connect proxy only; "
                 "tokens are refused (4001)")
    if settings.jwt_jwks_url:
        log.info("tokens verified against the JWKS %s (%s), refetched at most every %gs",
                 display_url(settings.jwt_jwks_url), ",".join(settings.jwt_algorithms),
                 settings.jwks_refresh_min)


def _display_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _discard(_: object) -> None:
    """PeriodicCallback wants callables that return None."""
