"""Prometheus metrics, held in a registry of their own per server.

A private :class:`~prometheus_client.CollectorRegistry` (not the library's
global one) lets several servers live in one process, as the tests do.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """Every metric wsserver exports; one instance per server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "wsserver_connections", "Open authenticated WebSocket connections", registry=r
        )
        self.connections_unverified = Gauge(
            "wsserver_connections_unverified",
            "Upgraded connections refused after the upgrade (bad token, user cap) "
            "and not yet closed",
            registry=r,
        )
        self.users = Gauge("wsserver_users", "Users with at least one open connection", registry=r)
        self.rooms = Gauge("wsserver_rooms", "Rooms with at least one member", registry=r)
        self.connections_accepted = Counter(
            "wsserver_connections_accepted", "Connections that passed the handshake", registry=r
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
            "wsserver_task_queue_depth", "Tasks waiting or running in the pool", registry=r
        )
        self.draining = Gauge("wsserver_draining", "1 while the server shuts down", registry=r)
        self.broker_up = Gauge(
            "wsserver_broker_up", "1 while the broker answers its readiness probe", registry=r
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

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
