"""The one metrics reader: a sample's value, from /metrics text or a live registry.

``/metrics`` text is parsed by prometheus_client's own parser, not by
regular expressions; an in-process :class:`~wsserver.metrics.Metrics`
registry, or one of its counters or gauges, is read through the same
``collect()`` families, so a test reads a sample the same way wherever it
comes from::

    value(srv, "wsserver_closes_total", code="4001")        # a RunningServer's /metrics
    value(state.metrics.registry, "wsserver_connections")   # in-process
    value(services.metrics.closes, code="4001")             # one family: its own sample
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Protocol

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.support.waiting import eventually


class Exposes(Protocol):
    """Anything serving /metrics text (``RunningServer``)."""

    def metrics(self) -> str: ...


def families(source: str | Exposes | Any) -> Iterable[Metric]:
    """The metric families of Prometheus text, of a server's /metrics, or of a
    registry or collector (anything with ``collect()``)."""
    if isinstance(source, str):
        return text_string_to_metric_families(source)
    if hasattr(source, "collect"):
        collected: Iterable[Metric] = source.collect()
        return collected
    return text_string_to_metric_families(source.metrics())


def sample(source: str | Exposes | Any, name: str | None = None, /,
           **labels: str) -> float | None:
    """The value of sample ``name`` with exactly ``labels``, or None when absent.

    Without ``name``, a family's own sample: the one named after the family
    (a gauge) or its ``_total`` (a counter).
    """
    for family in families(source):
        names = {family.name, family.name + "_total"} if name is None else {name}
        for found in family.samples:
            if found.name in names and found.labels == labels:
                return float(found.value)
    return None


def value(source: str | Exposes | Any, name: str | None = None, /, **labels: str) -> float:
    """:func:`sample`, 0 when absent (a counter never incremented is not exported)."""
    found = sample(source, name, **labels)
    return 0.0 if found is None else found


def labelled(source: str | Exposes | Any, name: str | None = None, /
             ) -> dict[str | tuple[str, ...], float]:
    """Every sample of ``name`` (as :func:`sample` finds it) by its label values:
    the value itself for one label, a tuple for several."""
    found: dict[str | tuple[str, ...], float] = {}
    for family in families(source):
        names = {family.name, family.name + "_total"} if name is None else {name}
        for each in family.samples:
            if each.name in names:
                values = tuple(each.labels.values())
                found[values[0] if len(values) == 1 else values] = float(each.value)
    return found


async def read(server: Exposes, name: str, /, **labels: str) -> float:
    """:func:`value` of a server's /metrics, fetched off the event loop."""
    return value(await asyncio.to_thread(server.metrics), name, **labels)


async def reaches(server: Exposes, expected: float, name: str, /, **labels: str) -> None:
    """Wait until ``name{labels}`` on ``server`` equals ``expected`` (state that only
    /metrics shows; polled)."""

    async def check() -> bool:
        return await read(server, name, **labels) == expected

    await eventually(check, f"{name}{labels} == {expected}")

