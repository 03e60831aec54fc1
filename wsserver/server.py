"""Start-up and graceful shutdown of one wsserver process.

Start: bind, start the task pool and the monitor, then tell systemd READY=1.
Stop (SIGTERM or SIGINT): /readyz turns 503, the listener closes, every
connection gets 1001, the drain waits up to ``--drain-timeout`` for them to
go, then the pool's workers are stopped and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import ssl
import time

from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from wsserver.app import ServerState, make_app
from wsserver.auth import DEMO_AUDIENCE
from wsserver.config import Settings
from wsserver.errors import ConfigError
from wsserver.listener import Listener
from wsserver.monitor import ConnectionMonitor
from wsserver.origin import OriginPolicy
from wsserver.sdnotify import SystemdNotifier

log = logging.getLogger("wsserver.server")

MAX_BODY_SIZE = 64 * 1024
#: Descriptors beyond the connections: listeners, the task pool, logs, HTTP requests.
FILE_LIMIT_HEADROOM = 256
LISTEN_BACKLOG = 1024


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


class Server:
    """One wsserver: an HTTP server, its shared state and its background jobs."""

    def __init__(self, settings: Settings, notifier: SystemdNotifier | None = None) -> None:
        self.settings = settings
        self.state = ServerState.from_settings(settings)
        self.app = make_app(self.state)
        if notifier is None:
            notifier = SystemdNotifier.from_environ(os.environ)
            # As sd_notify(unset_environment=1): the task workers must not
            # inherit the socket and speak for the service.
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        self.notifier = notifier
        self.http_server: Listener | None = None
        self.port = settings.port
        self._jobs: list[PeriodicCallback] = []
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
        sockets = bind_sockets(settings.port, settings.host, backlog=LISTEN_BACKLOG)
        self.port = sockets[0].getsockname()[1]
        if settings.default_origins:
            self.state.origins = OriginPolicy(settings.loopback_origins(self.port))
        self.state.pool.start()
        self.http_server = Listener(
            self.app,
            ssl_options=ssl_context,
            # Both bound how long a client may take to send its request, which
            # cuts off slowloris connections that trickle headers.
            idle_connection_timeout=settings.header_timeout,
            body_timeout=settings.header_timeout,
            max_header_size=settings.max_header_size,
            max_body_size=MAX_BODY_SIZE,
        )
        self.http_server.add_sockets(sockets)

        monitor = ConnectionMonitor(self.state.snapshot, self.state.housekeeping)
        self._jobs.append(
            PeriodicCallback(lambda: _discard(monitor.check()), settings.monitor_interval * 1000)
        )
        if settings.ping_interval:
            # Each connection is pinged within a tenth of the interval of its due time.
            self._jobs.append(
                PeriodicCallback(self.state.keepalive, settings.ping_interval * 100)
            )
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
        log.info("allowed origins: %s", ", ".join(sorted(self.state.origins.allowed)) or "none")
        log.info("listening on %s://%s:%d/", settings.scheme, _display_host(settings.host),
                 self.port)
        _tune_gc()
        self.notifier.ready()
        self.notifier.status(f"serving on port {self.port}")

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
            await self._stop_requested.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, close every connection with 1001, drain, stop the pool."""
        state = self.state
        if state.draining:
            return
        state.draining = True
        state.metrics.draining.set(1)
        self.notifier.stopping()
        open_now = state.registry.total
        log.info("shutting down: closing %d connection(s) with 1001", open_now)
        if self.http_server is not None:
            self.http_server.stop()
        for connection in state.registry:
            connection.shut_down()
        deadline = time.monotonic() + self.settings.drain_timeout
        while state.registry.total and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.registry.total:
            log.warning("drain timeout: dropping %d connection(s)", state.registry.total)
            for connection in state.registry:
                connection.on_connection_close()
        for job in self._jobs:
            job.stop()
        if self.http_server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.http_server.close_all_connections(), 1.0)
        state.pool.shutdown()
        self.notifier.close()
        log.info("stopped")


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


def _display_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _discard(_: object) -> None:
    """PeriodicCallback wants callables that return None."""
