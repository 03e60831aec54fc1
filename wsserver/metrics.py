"""Prometheus metrics, held in a registry of their own per server.

A private :class:`~prometheus_client.CollectorRegistry` (not the library's
global one) lets several servers live in one process, as the tests do.

Under ``--workers N`` every worker writes its metrics to memory-mapped files
in a directory the supervisor made (prometheus_client's multiprocess mode),
and a scrape on any worker reads every worker's files: the answer is the
machine's. Counters and histograms are summed over the workers (a restarted
worker goes on from its predecessor's counts, so they never go back); each
gauge says how it is combined (``multiprocess_mode``): live counts are summed,
``wsserver_draining`` is the highest, ``wsserver_broker_up`` the lowest, and
``wsserver_users`` and ``wsserver_rooms`` (distinct per worker, not addable)
carry a ``worker`` label. A dead worker's gauges are dropped
(:func:`forget_worker`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.samples import Sample

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "WorkerFiles", "forget_worker"]


@dataclass(frozen=True)
class WorkerFiles:
    """Where one worker of ``--workers`` keeps its metrics, and which it is.

    Attributes:
        directory: shared by every worker (the supervisor makes and removes it).
        worker: this worker's number; its files are named after it, so a
            replacement takes over its predecessor's counters.
        started_at: when the supervisor started (``/stats``' uptime).
    """

    directory: str
    worker: int
    started_at: float


def forget_worker(directory: str, worker: int) -> None:
    """Drop the gauges of a worker that exited (its counters stay in the sums)."""
    mark_process_dead(worker, directory)  # type: ignore[no-untyped-call]


class _WorkerLabel:
    """The multiprocess collector, with the library's ``pid`` label named
    ``worker`` (the files carry the worker's number, not a process id)."""

    def __init__(self, directory: str) -> None:
        self._collector = MultiProcessCollector(None, directory)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for metric in self._collector.collect():  # type: ignore[no-untyped-call]
            metric.samples = [
                Sample(s.name, {("worker" if k == "pid" else k): v for k, v in s.labels.items()},
                       s.value, s.timestamp, s.exemplar)
                for s in metric.samples
            ]
            yield metric


class Metrics:
    """Every metric wsserver exports; one instance per server.

    Args:
        workers: under ``--workers``, this worker's shared files; the
            metrics are then written there and read back from every worker's.
    """

    def __init__(self, workers: WorkerFiles | None = None) -> None:
        self.workers = workers
        self.registry = CollectorRegistry(auto_describe=True)
        self._machine: CollectorRegistry | None = None
        if workers is not None:
            # prometheus_client picks where values live once, from the
            # environment at import; a forked worker chooses the files itself,
            # before its first metric. Named by the worker's number, not its
            # pid (the library allows any identifier unique among live processes).
            # The files' directory is read from the environment at each new
            # labelled child, so it stays set for the worker's lifetime.
            number = workers.worker
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = workers.directory
            prometheus_values.ValueClass = prometheus_values.MultiProcessValue(  # type: ignore[no-untyped-call]
                lambda: number
            )
            self._machine = CollectorRegistry(auto_describe=False)
            self._machine.register(_WorkerLabel(workers.directory))
        r = self.registry
        self.connections = Gauge(
            "wsserver_connections",
            "Open authenticated connections (WebSocket and HTTP streaming)", registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_unverified = Gauge(
            "wsserver_connections_unverified",
            "Upgraded connections refused after the upgrade (bad token, user cap) "
            "and not yet closed",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.users = Gauge("wsserver_users", "Users with at least one open connection",
                           registry=r, multiprocess_mode="liveall")
        self.rooms = Gauge("wsserver_rooms", "Rooms with at least one member", registry=r,
                           multiprocess_mode="liveall")
        self.connections_accepted = Counter(
            "wsserver_connections_accepted", "Connections that passed the handshake", registry=r
        )
        # wsserver_connections and wsserver_connections_accepted stay the totals
        # (the contract names the first); these split them by what carries them.
        self.connections_by_transport = Gauge(
            "wsserver_connections_by_transport",
            "Open authenticated connections by transport (websocket, sse)",
            ["transport"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_accepted_by_transport = Counter(
            "wsserver_connections_accepted_by_transport",
            "Connections that passed the handshake, by transport (websocket, sse)",
            ["transport"],
            registry=r,
        )
        self.tickets = Counter(
            "wsserver_tickets",
            "POST /auth/ticket answers, by outcome (issued, unauthorized, unavailable)",
            ["outcome"],
            registry=r,
        )
        self.stream_sends = Counter(
            "wsserver_sse_sends",
            "POST /sse/send answers, by outcome (accepted, forwarded, unknown_session, "
            "too_large, busy, bad_request, origin, unavailable)",
            ["outcome"],
            registry=r,
        )
        self.messages = Counter(
            "wsserver_messages", "Client messages received", ["type"], registry=r
        )
        self.deliveries = Counter(
            "wsserver_deliveries", "Room messages delivered to members", registry=r
        )
        self.rejections = Counter(
            "wsserver_rejections", "Handshakes and messages refused", ["reason"], registry=r
        )
        self.closes = Counter(
            "wsserver_closes", "Connections closed, by close code", ["code"], registry=r
        )
        self.slow_consumers = Counter(
            "wsserver_slow_consumer_disconnects",
            "Connections closed because the client did not read fast enough",
            registry=r,
        )
        self.lagging = Gauge(
            "wsserver_lagging_members",
            "Room members whose live messages wait because their backlog passed "
            "--max-write-buffer (each catches up from the history once drained)",
            registry=r,
        )
        self.tasks = Counter(
            "wsserver_tasks", "Tasks finished, by name and outcome", ["name", "outcome"], registry=r
        )
        self.task_duration = Histogram(
            "wsserver_task_duration_seconds",
            "Wall time of tasks from submission to answer",
            ["name"],
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.task_queue_depth = Gauge(
            "wsserver_task_queue_depth", "Tasks waiting or running in the pool", registry=r,
            multiprocess_mode="livesum",
        )
        self.draining = Gauge("wsserver_draining", "1 while the server shuts down", registry=r,
                              multiprocess_mode="livemax")
        self.broker_up = Gauge(
            "wsserver_broker_up", "1 while the broker answers its readiness probe", registry=r,
            multiprocess_mode="livemin",
        )
        self.broker_errors = Counter(
            "wsserver_broker_errors",
            "Broker commands and probes that failed (Redis unreachable, timed out)",
            registry=r,
        )
        self.broker_publish = Histogram(
            "wsserver_broker_publish_seconds",
            "Time for one publish to go through the broker",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.recoveries = Counter(
            "wsserver_recoveries",
            "Joins with 'since', by outcome (recovered or lost)",
            ["outcome"],
            registry=r,
        )
        self.gap_repairs = Counter(
            "wsserver_gap_repairs",
            "Gaps in a room's offsets seen on this node, by outcome (repaired or lost)",
            ["outcome"],
            registry=r,
        )
        self.api_requests = Counter(
            "wsserver_api_requests",
            "Server API requests, by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )

        self.proxy_requests = Counter(
            "wsserver_proxy_requests",
            "Calls to the application's backend, by kind (connect, subscribe, publish, rpc) "
            "and outcome (ok, refused, error, timeout, invalid, overloaded)",
            ["kind", "outcome"],
            registry=r,
        )
        self.proxy_seconds = Histogram(
            "wsserver_proxy_request_seconds",
            "Time for one call to the application's backend, by kind",
            ["kind"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.jwks_fetches = Counter(
            "wsserver_jwks_fetches",
            "Fetches of the JSON Web Key Set, by outcome (ok, error, invalid)",
            ["outcome"],
            registry=r,
        )
        self.jwks_keys = Gauge(
            "wsserver_jwks_keys", "Signing keys held from the JSON Web Key Set", registry=r
        )

        #: The per-transport children, looked up once (``labels()`` is a few
        #: microseconds a call, and every connect and close made two).
        self._transports: dict[str, tuple[Gauge, Counter]] = {}

    def connection_opened(self, transport: str) -> None:
        """An authenticated connection over ``transport`` opened: count it in
        ``wsserver_connections`` and ``wsserver_connections_accepted``, in total
        and by transport."""
        children = self._transports.get(transport)
        if children is None:
            children = self._transports[transport] = (
                self.connections_by_transport.labels(transport),
                self.connections_accepted_by_transport.labels(transport),
            )
        self.connections.inc()
        self.connections_accepted.inc()
        children[0].inc()
        children[1].inc()

    def connection_closed(self, transport: str) -> None:
        """An authenticated connection counted by :meth:`connection_opened` closed."""
        self.connections.dec()
        self._transports[transport][0].dec()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (every worker's, under
        ``--workers``)."""
        return generate_latest(self._machine or self.registry)

    def totals(self) -> dict[str, float]:
        """Each metric's samples summed over labels and workers: a counter's
        ``_total``, a gauge's value (what ``/stats`` shows)."""
        sums: dict[str, float] = {}
        for metric in (self._machine or self.registry).collect():
            own = metric.name + "_total" if metric.type == "counter" else metric.name
            sums[metric.name] = sum(s.value for s in metric.samples if s.name == own)
        return sums

