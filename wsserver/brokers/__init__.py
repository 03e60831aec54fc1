"""Brokers, chosen by ``--broker``: ``memory`` or a Redis URL."""

from __future__ import annotations

from wsserver.brokers.base import Broker, BrokerUnavailable

__all__ = ["Broker", "BrokerUnavailable", "make_broker"]


def make_broker(url: str, node_name: str) -> Broker:
    """The broker named by ``--broker`` (``memory``, ``redis://``, ``rediss://``, ``unix://``)."""
    if url == "memory":
        from wsserver.brokers.memory import MemoryBroker

        return MemoryBroker(node_name)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from wsserver.brokers.redis import RedisBroker  # type: ignore[import-not-found,unused-ignore]

        broker: Broker = RedisBroker(url, node_name)
        return broker
    raise ValueError(f"unknown broker {url!r}: use 'memory' or a redis:// URL")
