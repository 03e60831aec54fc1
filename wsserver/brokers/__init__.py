"""Brokers, chosen by ``--broker``: ``memory`` or a Redis URL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsserver.brokers.base import Broker, BrokerUnavailable

if TYPE_CHECKING:
    from wsserver.metrics import Metrics

__all__ = ["Broker", "BrokerUnavailable", "make_broker"]


def make_broker(
    url: str, node_name: str, *, metrics: Metrics | None = None, probe_interval: float = 2.0,
    heartbeat_interval: float = 5.0, node_ttl: float = 15.0,
) -> Broker:
    """The broker named by ``--broker`` (``memory``, ``redis://``, ``rediss://``, ``unix://``,
    ``redis+sentinel://``).

    Args:
        metrics: gets ``wsserver_broker_*`` (the memory broker is always up).
        probe_interval: ``--broker-probe-interval``, for the Redis broker.
        heartbeat_interval, node_ttl: ``--broker-heartbeat``, ``--broker-node-ttl``.
    """
    if url == "memory":
        from wsserver.brokers.memory import MemoryBroker

        if metrics is not None:
            metrics.broker_up.set(1)
        return MemoryBroker(node_name)
    if url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://",
                       "rediss+sentinel://")):
        # Imported here: redis-py loads only when a Redis broker is configured.
        from wsserver.brokers.redis import RedisBroker

        return RedisBroker(
            url, node_name, metrics=metrics, probe_interval=probe_interval,
            heartbeat_interval=heartbeat_interval, node_ttl=node_ttl,
        )
    raise ValueError("unknown broker: use 'memory', a redis:// or a redis+sentinel:// URL")
