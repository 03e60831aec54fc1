"""RedisBroker when Redis fails: stopped, restarted empty, frozen, pub/sub killed, idle.

Each test has its own redis-server (``own_redis``). ``up`` has no event to
await, so :func:`until` polls it (every 20 ms, bounded).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from tests.support.aio import run
from tests.support.brokers import Harness, RecordingSink
from tests.support.redis_server import RedisServer
from tests.support.waiting import until
from wsserver.brokers.base import Broker, BrokerUnavailable, HistorySpec, Presence
from wsserver.brokers.redis import MAX_CONNECTIONS

T = TypeVar("T")
PROBE = 0.5
KEEP = HistorySpec(size=10, ttl=60)


async def unavailable_within(broker: Broker, seconds: float) -> None:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.publish("r", b"{}", history=KEEP)
    assert time.monotonic() - started < seconds


async def delivers(broker: Broker, sink: RecordingSink, room: str) -> None:
    await sink.barrier(broker, room)


@pytest.fixture
def harness(own_redis: RedisServer) -> Harness:
    return Harness("redis", own_redis)


def test_stopped_then_restarted_empty(harness: Harness, own_redis: RedisServer) -> None:
    async def scenario() -> None:
        async with harness.started(probe_interval=PROBE) as (broker, sink):
            await broker.subscribe("r")
            before = await broker.publish("r", b'{"n":1}', history=KEEP)
            await broker.presence_add("r", "u")
            await broker.presence_add("r", "u")
            await broker.user_connect("u", 5)
            assert broker.up
            own_redis.stop()
            assert await until(lambda: not broker.up, 2 * PROBE + 0.3) <= 2 * PROBE + 0.3
            await unavailable_within(broker, 1.5)
            with pytest.raises(BrokerUnavailable):
                await broker.subscribe("new-room")
            with pytest.raises(BrokerUnavailable):
                await broker.presence("r")

            own_redis.start()
            await until(lambda: broker.up, 10)
            await sink.wait(lambda: bool(sink.resubscribed))
            assert sink.resubscribed == [["r"]]
            after = await broker.publish("r", b'{"n":2}', history=KEEP)
            # Redis lost the room (no persistence): a new epoch, offsets from 1.
            assert after.epoch != before.epoch
            assert after.offset == 1
            await sink.wait(lambda: any(p.epoch == after.epoch for p in sink.publications))
            await delivers(broker, sink, "r")
            # The node put its own presence and user entries back.
            presence = await broker.presence("r")
            assert (presence.users, presence.connections) == (["u"], 2)
            assert await broker.user_connections(["u"]) == {"u": 1}
            assert await broker.user_connect("u", 2) == 2

    run(scenario())


def test_frozen_redis_counts_as_down(harness: Harness, own_redis: RedisServer) -> None:
    async def scenario() -> None:
        async with harness.started(probe_interval=PROBE) as (broker, sink):
            await broker.subscribe("r")
            assert broker.up
            own_redis.freeze()
            try:
                assert await until(lambda: not broker.up, 2 * PROBE + 0.3) <= 2 * PROBE + 0.3
                await unavailable_within(broker, 1.5)
            finally:
                own_redis.thaw()
            await until(lambda: broker.up, 10)
            await sink.wait(lambda: bool(sink.resubscribed))
            assert sink.resubscribed[-1] == ["r"]
            await delivers(broker, sink, "r")

    run(scenario())


def test_killed_pubsub_connection_resubscribes(harness: Harness, own_redis: RedisServer) -> None:
    async def scenario() -> None:
        async with harness.started(probe_interval=PROBE) as (broker, sink):
            await broker.subscribe("r")
            await broker.subscribe("s")
            killed = own_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
            assert killed == 1
            await sink.wait(lambda: bool(sink.resubscribed))
            assert sink.resubscribed == [["r", "s"]]
            await delivers(broker, sink, "r")
            await delivers(broker, sink, "s")
            await until(lambda: broker.up, 2 * PROBE + 0.3)

    run(scenario())


def test_idle_subscription_outlives_the_socket_timeout(harness: Harness) -> None:
    async def scenario() -> None:
        # Probes far apart: the subscription sees no traffic for 3 socket timeouts.
        async with harness.started(
            probe_interval=60, command_timeout=0.3, heartbeat_interval=30, node_ttl=90
        ) as (broker, sink):
            await broker.subscribe("r")
            await asyncio.sleep(1.0)
            await broker.publish("r", b'{"late":1}')
            await sink.wait(lambda: sink.payloads() == [b'{"late":1}'])
            assert sink.resubscribed == []
            assert broker.up

    run(scenario())


def test_starts_down_and_comes_up(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A node started before its Redis serves (down, logged) and heals by itself."""
    server = RedisServer(tmp_path_factory.mktemp("late-redis"))
    harness = Harness("redis", server)

    async def scenario() -> None:
        async with harness.started(probe_interval=PROBE) as (broker, _sink):
            assert not broker.up
            with pytest.raises(BrokerUnavailable):
                await broker.history("r", KEEP)
            server.start()
            await until(lambda: broker.up, 10)
            assert (await broker.history("r", KEEP)).offset == 0

    try:
        run(scenario())
    finally:
        server.stop()


def test_leaving_during_an_outage_reaches_redis_after_it(
    harness: Harness, own_redis: RedisServer
) -> None:
    async def scenario() -> None:
        async with harness.started(probe_interval=PROBE) as (broker, _sink):
            await broker.presence_add("r", "u")
            await broker.user_connect("u", 5)
            own_redis.freeze()
            try:
                await until(lambda: not broker.up, 2 * PROBE + 0.3)
                started = time.monotonic()
                with pytest.raises(BrokerUnavailable):
                    await broker.presence_remove("r", "u")
                with pytest.raises(BrokerUnavailable):
                    await broker.user_disconnect("u")
                assert time.monotonic() - started < 0.1  # known down: no timeout
            finally:
                own_redis.thaw()
            await until(lambda: broker.up, 10)
            await until_async(lambda: broker.presence("r"), lambda p: p.users == [], 5)
            assert await broker.user_connections(["u"]) == {"u": 0}

    run(scenario())


async def until_async(
    read: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float
) -> T:
    """Until ``done(await read())`` (state in Redis, which sends no event)."""
    started = time.monotonic()
    while True:
        value = await read()
        if done(value):
            return value
        assert time.monotonic() - started < timeout, f"still {value!r}"
        await asyncio.sleep(0.05)


def clients_of(redis: RedisServer, name: str) -> int:
    """Connections on ``redis`` named ``wsserver:NAME`` (pub/sub included)."""
    listing = redis.command("CLIENT", "LIST")
    text = listing.decode() if isinstance(listing, bytes) else str(listing)
    return sum(1 for line in text.splitlines() if f"name=wsserver:{name} " in line + " ")


def test_a_burst_of_commands_shares_one_connection_and_leaves_none_behind(
    harness: Harness, own_redis: RedisServer
) -> None:
    """Issue 20: a thousand members leaving at once grew the pool to 31 connections
    that stayed open forever. Auto-pipelined, the burst shares one connection:
    none is opened for it, so none is left to close."""
    async def scenario() -> None:
        async with harness.started("burst", probe_interval=PROBE, heartbeat_interval=30,
                                   node_ttl=90) as (broker, _sink):
            before = clients_of(own_redis, "burst")
            await asyncio.gather(*(broker.presence_add("room", f"u{n}") for n in range(500)))
            await asyncio.gather(*(broker.presence_remove("room", f"u{n}") for n in range(500)))
            during = clients_of(own_redis, "burst")
            # The pub/sub connection, one for the batches, perhaps one for a probe.
            assert during <= 3 < MAX_CONNECTIONS, during
            assert during <= before + 1, (before, during)
            assert await broker.presence("room") == Presence([], 0)
            assert (await broker.presence("room")).connections == 0  # and it still works
            assert clients_of(own_redis, "burst") <= during

    run(scenario())


def test_a_master_short_of_replicas_answers_writes_unavailable(
    harness: Harness, own_redis: RedisServer
) -> None:
    """With ``min-replicas-to-write`` and too few replicas, Redis refuses every write
    (NOREPLICAS, an error redis-py has no class for): callers get BrokerUnavailable
    (clients: ``unavailable``), as docs/deploy.md promises, and reads still work."""
    async def scenario() -> None:
        async with harness.started(probe_interval=60, heartbeat_interval=30,
                                   node_ttl=90) as (broker, _sink):
            await broker.presence_add("r", "u")
            own_redis.command("CONFIG", "SET", "min-replicas-to-write", 1)
            try:
                with pytest.raises(BrokerUnavailable):
                    await broker.publish("r", b"{}", history=KEEP)
                with pytest.raises(BrokerUnavailable):
                    await broker.user_connect("u", 5)
                assert await broker.presence("r") == Presence(["u"], 1)
            finally:
                own_redis.command("CONFIG", "SET", "min-replicas-to-write", 0)
            assert (await broker.publish("r", b"{}", history=KEEP)).offset == 1

    run(scenario())
