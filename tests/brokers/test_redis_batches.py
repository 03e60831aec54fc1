"""RedisBroker's auto-pipelining: every command made while a batch is in flight goes
out with the next batch, in one round trip over one connection, in the order made.

Each test has its own redis-server (``own_redis``) whose counters it resets.
Round trips are counted with Redis's own ``total_reads_processed`` (reads of
a client's socket: one per pipeline that fits in a read, a few for a big one)
and ``total_writes_processed``, connections with ``CLIENT LIST``.
Heartbeats and probes are far apart, so that only the test's commands count.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.support.aio import run
from tests.support.brokers import Harness
from tests.support.metrics import value
from tests.support.redis_server import RedisServer
from tests.support.waiting import until
from wsserver.brokers.base import BrokerUnavailable, HistorySpec, Presence
from wsserver.brokers.redis import MAX_CONNECTIONS, RedisBroker
from wsserver.brokers.redis_commands import SCRIPTS
from wsserver.metrics import Metrics

KEEP = HistorySpec(size=100, ttl=60)
QUIET = {"probe_interval": 60, "heartbeat_interval": 30, "node_ttl": 90}


@pytest.fixture
def harness(own_redis: RedisServer) -> Harness:
    return Harness("redis", own_redis)


def clients_of(redis: RedisServer, name: str) -> list[dict[str, str]]:
    """The connections on ``redis`` named ``wsserver:NAME`` (pub/sub included)."""
    listing = redis.command("CLIENT", "LIST")
    text = listing.decode() if isinstance(listing, bytes) else str(listing)
    found = []
    for line in text.splitlines():
        fields = dict(item.split("=", 1) for item in line.split(" ") if "=" in item)
        if fields.get("name") == f"wsserver:{name}":
            found.append(fields)
    return found


class RedisCounters:
    """Redis's reads, writes and commands between :meth:`reset` and :meth:`read`, less
    what the resetting and reading connections cost by themselves (measured first;
    their closing is counted whenever Redis sees it, so reads are right within 2)."""

    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.reset()
        self.noise = self._raw()

    def reset(self) -> None:
        self.redis.command("CONFIG", "RESETSTAT")

    def _raw(self) -> dict[str, Any]:
        stats = self.redis.command("INFO", "stats")
        commands = {
            name.removeprefix("cmdstat_"): entry["calls"]
            for name, entry in self.redis.command("INFO", "commandstats").items()
        }
        return {"reads": stats["total_reads_processed"],
                "writes": stats["total_writes_processed"], "commands": commands}

    def read(self) -> dict[str, Any]:
        seen = self._raw()
        return {"reads": seen["reads"] - self.noise["reads"],
                "writes": seen["writes"] - self.noise["writes"],
                "commands": {name: calls - self.noise["commands"].get(name, 0)
                             for name, calls in seen["commands"].items()}}


def test_a_connect_storm_shares_one_connection_and_a_few_round_trips(
    harness: Harness, own_redis: RedisServer
) -> None:
    """Issue 21: a thousand connects and joins at once each took a pooled connection
    and a round trip of their own (and waited over a second for one of the 16
    connections under load). Made together, they go out in a few pipelines."""
    metrics = Metrics()

    async def scenario() -> None:
        async with harness.started("storm", metrics=metrics, **QUIET) as (broker, _sink):
            # Every script loaded once, before the count.
            await broker.user_connect("warm", 10)
            await broker.presence_add("warm", "warm")
            await broker.publish("warm", b"{}", history=KEEP)
            counted = RedisCounters(own_redis)
            counted.reset()
            connects = [broker.user_connect(f"u{n}", 10) for n in range(500)]
            joins = [broker.presence_add("room", f"u{n}") for n in range(500)]
            publishes = [broker.publish("room", b'{"n":%d}' % n, history=KEEP)
                         for n in range(20)]
            answers = await asyncio.gather(*connects, *joins, *publishes)
            assert answers[:500] == [1] * 500
            assert answers[500:1000] == [True] * 500
            assert [a.offset for a in answers[1000:]] == list(range(1, 21))
            seen = counted.read()
            # Each ran once, as EVALSHA (no SCRIPT EXISTS, no retry).
            assert seen["commands"]["evalsha"] == 1020
            assert seen["commands"].get("script|exists", 0) == 0
            # The 1020 commands came in a pipeline or two (Redis reads a big
            # one in several reads, and answers it in several writes).
            assert seen["reads"] <= 20, seen
            assert seen["writes"] <= 20, seen
            # The pub/sub connection and one command connection, far from the bound.
            named = clients_of(own_redis, "storm")
            assert len(named) <= 3 < MAX_CONNECTIONS, named
            # The publish latency histogram counts publishes, not every command.
            assert value(metrics.registry, "wsserver_broker_publish_seconds_count") == 21

    run(scenario())


def test_mixed_calls_run_in_the_order_made(harness: Harness, own_redis: RedisServer) -> None:
    """One batch of different commands: Redis runs them in the order they were
    made, so each answer is what that order gives."""

    async def scenario() -> None:
        async with harness.started("order", **QUIET) as (broker, sink):
            await broker.subscribe("r")
            await broker.publish("r", b'{"n":0}', history=KEEP)  # offset 1
            counted = RedisCounters(own_redis)
            counted.reset()
            calls = [
                broker.user_connect("u", 2),                     # 1
                broker.publish("r", b'{"n":1}', history=KEEP),   # offset 2
                broker.presence_add("r", "u"),                   # first: True
                broker.user_connect("u", 2),                     # 2
                broker.history("r", KEEP),                       # top 2
                broker.user_connect("u", 2),                     # at the limit: None
                broker.presence_add("r", "u"),                   # False
                broker.user_disconnect("u"),
                broker.presence("r"),                            # u, 2 connections
                broker.user_connections(["u"]),                  # 1
                broker.presence_remove("r", "u"),                # not the last: False
                broker.publish("r", b'{"n":2}', history=KEEP),   # offset 3
                broker.user_connect("u", 2),                     # 2
                broker.presence_remove("r", "u"),                # the last: True
                broker.history("r", KEEP, since=1),              # offsets 2, 3
            ]
            answers = await asyncio.gather(*calls)
            assert answers[0] == 1
            assert answers[1].offset == 2
            assert answers[2] is True
            assert answers[3] == 2
            assert answers[4].offset == 2
            assert answers[5] is None
            assert answers[6] is False
            assert answers[7] is None
            assert (answers[8].users, answers[8].connections) == (["u"], 2)
            assert answers[9] == {"u": 1}
            assert answers[10] is False
            assert answers[11].offset == 3
            assert answers[12] == 2
            assert answers[13] is True
            assert [p.offset for p in answers[14].publications] == [2, 3]
            # All in one round trip (one read; the closing admin connections'
            # own reads make the count move by one or two either way).
            assert counted.read()["reads"] <= 3
            await sink.wait(lambda: len(sink.publications) == 3)
            assert [p.offset for p in sink.publications] == [1, 2, 3]

    run(scenario())


def test_a_mixed_batch_after_redis_lost_its_scripts(
    harness: Harness, own_redis: RedisServer
) -> None:
    """NOSCRIPT for the script calls of a batch (Redis restarted, or SCRIPT FLUSH):
    every script is loaded once, in one transaction, and those calls sent again
    in order, in one more round trip; every caller gets its own answer."""

    async def scenario() -> None:
        async with harness.started("flushed", **QUIET) as (broker, sink):
            await broker.subscribe("r")
            await broker.publish("r", b'{"n":1}', history=KEEP)
            await broker.user_connect("v", 10)
            counted = RedisCounters(own_redis)
            own_redis.command("SCRIPT", "FLUSH")  # as a restart without persistence does
            counted.reset()
            answers = await asyncio.gather(
                broker.user_connect("u", 10),
                broker.publish("r", b'{"n":2}', history=KEEP),
                broker.presence_add("r", "u"),
                broker.history("r", KEEP),
                broker.user_connect("u", 10),
                broker.presence("r"),
                broker.publish("r", b'{"n":3}', history=KEEP),
                broker.presence_add("r", "u"),
            )
            assert answers[0] == 1
            assert answers[1].offset == 2
            assert answers[2] is True
            assert answers[3].offset == 2  # the publish before it, not the one after
            assert answers[4] == 2
            # The presence read is no script: it ran in the first round trip,
            # before the joins sent again.
            assert answers[5].users == []
            assert answers[6].offset == 3
            assert answers[7] is False
            seen = counted.read()
            # Every script loaded once, together, not once per call.
            assert seen["commands"]["script|load"] == len(SCRIPTS)
            assert seen["commands"]["exec"] == 1
            assert seen["commands"]["evalsha"] == 7 + 7  # the batch, then sent again
            assert seen["reads"] <= 4  # the batch, the loads and the calls sent again
            await sink.wait(lambda: len(sink.publications) == 3)
            assert [p.offset for p in sink.publications] == [1, 2, 3]
            assert await broker.user_connections(["u"]) == {"u": 2}
            assert (await broker.presence("r")).connections == 2

    run(scenario())


def test_a_connection_killed_mid_batch_fails_every_caller_of_that_batch(
    harness: Harness, own_redis: RedisServer
) -> None:
    """Redis paused for writes holds the batch on its connection; killing that
    connection fails each caller of the batch with BrokerUnavailable (none of its
    commands ran), counted once per caller. The commands made meanwhile go out
    as the next batch, on a new connection, and work."""
    metrics = Metrics()

    async def scenario() -> None:
        async with harness.started(
            "killed", metrics=metrics, command_timeout=5, **QUIET
        ) as (broker, _sink):
            assert isinstance(broker, RedisBroker)
            await broker.presence_add("warm", "warm")
            await broker.user_connect("warm", 10)
            errors = value(metrics.registry, "wsserver_broker_errors_total")
            own_redis.command("CLIENT", "PAUSE", 10_000, "WRITE")
            try:
                first = [asyncio.ensure_future(call) for call in (
                    *(broker.user_connect(f"a{n}", 10) for n in range(10)),
                    *(broker.presence_add("room", f"a{n}") for n in range(10)),
                )]
                await until(lambda: any(c.get("flags") == "b"
                                        for c in clients_of(own_redis, "killed")), 5)
                second = [asyncio.ensure_future(call) for call in (
                    *(broker.user_connect(f"b{n}", 10) for n in range(10)),
                    *(broker.presence_add("room", f"b{n}") for n in range(10)),
                )]
                held = [c for c in clients_of(own_redis, "killed") if c.get("flags") == "b"]
                assert len(held) == 1, held
                own_redis.command("CLIENT", "KILL", "ID", held[0]["id"])
                started = time.monotonic()
                failed = await asyncio.gather(*first, return_exceptions=True)
                assert time.monotonic() - started < 2  # the kill, not a timeout
                assert all(isinstance(f, BrokerUnavailable) for f in failed), failed
                assert not any(s.done() for s in second)  # still held by the pause
            finally:
                own_redis.command("CLIENT", "UNPAUSE")
            answers = await asyncio.gather(*second)
            assert answers == [1] * 10 + [True] * 10
            assert value(metrics.registry, "wsserver_broker_errors_total") == errors + 20
            presence = await broker.presence("room")
            assert presence.users == [f"b{n}" for n in range(10)]
            # The user connects of the failed batch count on this node (their
            # callers admit them on its count alone); the next heartbeat puts
            # this node's account back in Redis, where they count for everyone.
            assert await broker.user_connections(["a0", "b0"]) == {"a0": 0, "b0": 1}
            await broker.heartbeat()
            assert await broker.user_connections(["a0", "b0"]) == {"a0": 1, "b0": 1}
            assert (await broker.presence("room")).users == [f"b{n}" for n in range(10)]

    run(scenario())


def test_a_read_only_replica_fails_the_writes_of_a_batch_as_unavailable(
    harness: Harness, own_redis: RedisServer
) -> None:
    """After a failover, before the new master is promoted, Redis answers READONLY to
    each write in place: those callers get BrokerUnavailable (clients:
    ``unavailable``), the reads of the same batch their answers."""
    metrics = Metrics()

    async def scenario() -> None:
        async with harness.started("replica", metrics=metrics, **QUIET) as (broker, _sink):
            await broker.publish("r", b"{}", history=KEEP)
            await broker.presence_add("r", "u")
            errors = value(metrics.registry, "wsserver_broker_errors_total")
            own_redis.command("REPLICAOF", "127.0.0.1", "1")  # a master that never answers
            try:
                answers = await asyncio.gather(
                    broker.publish("r", b"{}", history=KEEP),
                    broker.presence("r"),
                    broker.user_connect("v", 5),
                    return_exceptions=True,
                )
            finally:
                own_redis.command("REPLICAOF", "NO", "ONE")
            assert isinstance(answers[0], BrokerUnavailable), answers[0]
            assert answers[1] == Presence(["u"], 1)
            assert isinstance(answers[2], BrokerUnavailable), answers[2]
            assert value(metrics.registry, "wsserver_broker_errors_total") == errors + 2
            assert (await broker.publish("r", b"{}", history=KEEP)).offset == 2

    run(scenario())
