"""Two RedisBroker nodes sharing one redis-server: what crosses nodes.

Also the pure parts of the Redis broker (envelope, URL redaction), which
need no server.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from tests.support.aio import run
from tests.support.brokers import Harness
from tests.support.metrics import value
from tests.support.redis_server import RedisServer
from tests.support.servers import ROOT
from tests.support.waiting import until
from wsserver.brokers.base import HistorySpec, Publication
from wsserver.brokers.redis import RedisBroker, decode_envelope, encode_origin, redact_url
from wsserver.metrics import Metrics

KEEP = HistorySpec(size=10, ttl=60)


@pytest.mark.parametrize(
    ("envelope", "publication"),
    [
        (b"  - {}", Publication("r", b"{}")),
        (b"7 abc - {\"a\": 1}", Publication("r", b'{"a": 1}', 7, "abc")),
        (b"  3 a b{}", Publication("r", b"{}", origin="a b")),
        (b"1 e 0 {}", Publication("r", b"{}", 1, "e", "")),
    ],
)
def test_envelope_decodes(envelope: bytes, publication: Publication) -> None:
    assert decode_envelope("r", envelope) == publication


def test_origin_is_length_prefixed_in_bytes() -> None:
    assert encode_origin(None) == b"- "
    assert encode_origin("é 1") == b"4 \xc3\xa9 1"
    header = encode_origin("é 1")
    assert decode_envelope("r", b"  " + header + b"{}").origin == "é 1"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@redis:6379/2", "redis://:***@redis:6379/2"),
        ("rediss://app:s3cret@[::1]:6380/0", "rediss://app:***@[::1]:6380/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_cross_node_delivery_exactly_once_in_order(redis_harness: Harness) -> None:
    async def scenario() -> None:
        async with redis_harness.started("a") as (a, sink_a), \
                redis_harness.started("b") as (b, sink_b):
            await a.subscribe("r")
            await b.subscribe("r")
            for n in range(1, 21):
                publisher = a if n % 2 else b
                await publisher.publish("r", b'{"n":%d}' % n, history=KEEP, origin=f"o{n}")
            for sink in (sink_a, sink_b):
                await sink.wait(lambda sink=sink: len(sink.publications) >= 20)
            await sink_a.barrier(a, "r")
            await sink_b.barrier(b, "r")
            for sink in (sink_a, sink_b):
                real = [p for p in sink.publications if p.offset is not None]
                assert [p.offset for p in real] == list(range(1, 21))
                assert [p.origin for p in real] == [f"o{n}" for n in range(1, 21)]

    run(scenario())


def test_only_subscribed_nodes_receive(redis_harness: Harness) -> None:
    async def scenario() -> None:
        async with redis_harness.started("a") as (a, sink_a), \
                redis_harness.started("b") as (b, sink_b):
            await a.subscribe("r")
            await b.subscribe("other")
            await b.publish("r", b'{"n":1}')
            await sink_a.wait(lambda: len(sink_a.publications) == 1)
            await sink_b.barrier(b, "other")
            assert sink_b.payloads() == [b'{"marker":0}']

    run(scenario())


def test_user_cap_counts_every_node(redis_harness: Harness) -> None:
    async def scenario() -> None:
        async with redis_harness.started("a") as (a, _), redis_harness.started("b") as (b, _):
            assert await a.user_connect("u", 3) == 1
            assert await b.user_connect("u", 3) == 2
            assert await b.user_connect("u", 3) == 3
            assert await a.user_connect("u", 3) is None
            assert await a.user_connections(["u"]) == {"u": 3}
            await a.user_disconnect("u")
            await a.user_disconnect("u")  # a had only one
            assert await b.user_connections(["u"]) == {"u": 2}
            assert await a.user_connect("u", 3) == 3

    run(scenario())


def test_presence_flags_across_nodes(redis_harness: Harness) -> None:
    async def scenario() -> None:
        async with redis_harness.started("a") as (a, _), redis_harness.started("b") as (b, _):
            assert await a.presence_add("r", "u") is True
            assert await b.presence_add("r", "u") is False
            assert await b.presence_add("r", "v") is True
            presence = await a.presence("r")
            assert (presence.users, presence.connections) == (["u", "v"], 3)
            assert await a.presence_remove("r", "u") is False
            assert await a.presence_remove("r", "u") is False  # a has none left
            assert await b.presence_remove("r", "u") is True

    run(scenario())


def test_disconnect_reaches_every_node(redis_harness: Harness) -> None:
    async def scenario() -> None:
        async with redis_harness.started("a") as (a, sink_a), \
                redis_harness.started("b") as (_b, sink_b):
            await a.disconnect_user("u", 4003, "bye")
            assert sink_a.disconnects == [("u", 4003, "bye")]  # locally before answering
            await sink_b.wait(lambda: bool(sink_b.disconnects))
            assert sink_b.disconnects == [("u", 4003, "bye")]
            await a.disconnect_user("v", 4000, "")
            await sink_b.wait(lambda: len(sink_b.disconnects) == 2)
            assert sink_a.disconnects == [("u", 4003, "bye"), ("v", 4000, "")]

    run(scenario())


def test_nodes_lists_both_and_forgets_one_that_leaves(redis_harness: Harness) -> None:
    async def scenario() -> None:
        async with redis_harness.started("a") as (a, sink_a):
            sink_a.connections = 5
            async with redis_harness.started("b") as (_b, sink_b):
                sink_b.connections, sink_b.users = 2, 1
                await _b.heartbeat()  # b's counts as of now
                nodes = {n.name: n for n in await a.nodes()}
                assert set(nodes) == {"a", "b"}
                assert (nodes["a"].connections, nodes["b"].connections) == (5, 2)
                assert nodes["b"].users == 1
            assert [n.name for n in await a.nodes()] == ["a"]

    run(scenario())


def test_dead_node_loses_its_presence_within_its_ttl(redis_harness: Harness) -> None:
    """A node that stops heartbeating (as after SIGKILL) is reaped by a survivor."""

    async def scenario() -> None:
        async with redis_harness.started("a", node_ttl=0.6) as (a, sink_a), \
                redis_harness.started("c", node_ttl=0.6) as (c, sink_c):
            dead = redis_harness.make("b", node_ttl=0.6)
            assert isinstance(dead, RedisBroker)
            await dead.start(sink_a.__class__())
            await a.presence_add("r", "shared")
            await dead.presence_add("r", "shared")
            await dead.presence_add("r", "only-b")
            await dead.presence_add("s", "only-b")
            assert await dead.user_connect("only-b", 5) == 1
            assert await a.user_connect("shared", 5) == 1
            assert await dead.user_connect("shared", 5) == 2
            # Simulate SIGKILL: stop its tasks without unregistering.
            dead._registered = False
            started = asyncio.get_running_loop().time()
            await dead.close()
            for sink in (sink_a, sink_c):
                await sink.wait(lambda sink=sink: len(sink.lost) == 2, timeout=5)
                assert sorted(sink.lost) == [("r", "only-b"), ("s", "only-b")]
            assert asyncio.get_running_loop().time() - started < 0.6 + 0.2 + 1.0
            presence = await a.presence("r")
            assert (presence.users, presence.connections) == (["shared"], 1)
            assert set(await c.rooms()) == {"r"}
            assert await c.user_connections(["only-b", "shared"]) == {"only-b": 0, "shared": 1}
            assert [n.name for n in await c.nodes()] == ["a", "c"]

    run(scenario())


def test_metrics_follow_the_broker(redis_harness: Harness) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        async with redis_harness.started("a", metrics=metrics) as (a, _):
            assert value(metrics.registry, "wsserver_broker_up") == 1
            await a.publish("r", b"{}")
            count = value(metrics.registry, "wsserver_broker_publish_seconds_count")
            assert count == 1
        assert value(metrics.registry, "wsserver_broker_up") == 0

    run(scenario())


def test_make_broker_by_url() -> None:
    from wsserver.brokers import make_broker
    from wsserver.brokers.memory import MemoryBroker

    metrics = Metrics()
    assert isinstance(make_broker("memory", "n", metrics=metrics), MemoryBroker)
    assert value(metrics.registry, "wsserver_broker_up") == 1
    broker = make_broker("redis://127.0.0.1:1/0", "n", metrics=metrics, probe_interval=0.7)
    assert isinstance(broker, RedisBroker)
    assert (broker.kind, broker.probe_interval, broker.node_name) == ("redis", 0.7, "n")
    with pytest.raises(ValueError, match="unknown broker"):
        make_broker("http://x", "n")


def test_subscribes_room_channels_never_a_pattern(redis_harness: Harness) -> None:
    assert redis_harness.redis is not None
    redis = redis_harness.redis
    prefix = redis_harness.prefix

    def channels() -> set[str]:
        found = redis.command("PUBSUB", "CHANNELS", f"{prefix}:*")
        return {name.decode() for name in found}

    async def scenario() -> None:
        async with redis_harness.started("a") as (a, _):
            own = {f"{prefix}:control", f"{prefix}:probe:a", f"{prefix}:fwd:{a.node_tag}"}
            assert channels() == own
            await a.subscribe("chat:1")
            await a.subscribe("chat:2")
            assert channels() == own | {f"{prefix}:room:chat:1", f"{prefix}:room:chat:2"}
            await a.unsubscribe("chat:1")
            await until(lambda: f"{prefix}:room:chat:1" not in channels(), 2.0)
            assert redis.command("PUBSUB", "NUMPAT") == 0

    run(scenario())


def test_publish_is_one_command(own_redis: RedisServer) -> None:
    harness = Harness("redis", own_redis)

    def calls() -> dict[str, int]:
        info = own_redis.command("INFO", "commandstats")  # parsed by redis-py
        return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in info.items()}

    async def scenario() -> None:
        # No heartbeat or probe during the count.
        async with harness.started(
            "a", probe_interval=60, heartbeat_interval=30, node_ttl=90
        ) as (a, sink):
            await a.subscribe("r")
            await a.publish("r", b"{}", history=KEEP)  # loads the script once
            own_redis.command("CONFIG", "RESETSTAT")
            for n in range(10):
                await a.publish("r", b'{"n":%d}' % n, history=KEEP, idempotency_key=f"k{n}")
            await sink.wait(lambda: len(sink.publications) == 11)
            counted = calls()
            for admin in ("config|resetstat", "info", "hello"):  # this test's own
                counted.pop(admin, None)
            # Commands inside a script count too: each ran once per publish,
            # and the only command a client sent was EVALSHA.
            assert counted == {
                "evalsha": 10,
                "get": 10, "hget": 10, "hincrby": 10, "xadd": 10, "pexpire": 20,
                "publish": 10, "set": 10,
            }

    run(scenario())


def test_a_node_restarted_under_its_name_drops_what_it_left(redis_harness: Harness) -> None:
    async def scenario() -> None:
        async with redis_harness.started("a", node_ttl=60, heartbeat_interval=30) as (a, sink):
            old = redis_harness.make("x", node_ttl=60, heartbeat_interval=30)
            assert isinstance(old, RedisBroker)
            await old.start(sink.__class__())
            await old.presence_add("r", "gone")
            assert await old.user_connect("gone", 1) == 1
            old._registered = False  # killed: no clean leave
            await old.close()
            async with redis_harness.started("x", node_ttl=60, heartbeat_interval=30) as (new, _):
                await sink.wait(lambda: sink.lost == [("r", "gone")])
                assert (await a.presence("r")).users == []
                assert await new.user_connect("gone", 1) == 1

    run(scenario())


def test_sigkilled_node_disappears_with_its_users(redis_harness: Harness) -> None:
    """A real process, killed with SIGKILL: survivors reap it within its TTL."""
    assert redis_harness.redis is not None
    node = subprocess.Popen(
        [sys.executable, "-m", "tests.support.broker_node", redis_harness.redis.url,
         redis_harness.prefix, "doomed", "chat:1", "carol"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert node.stdout is not None
        assert node.stdout.readline().strip() == "ready"

        async def scenario() -> None:
            async with redis_harness.started("a") as (a, sink):
                assert {n.name for n in await a.nodes()} == {"a", "doomed"}
                assert (await a.presence("chat:1")).users == ["carol"]
                node.kill()
                started = asyncio.get_running_loop().time()
                await sink.wait(lambda: sink.lost == [("chat:1", "carol")], timeout=10)
                # node_ttl 1 s + one survivor heartbeat (0.2 s), with slack.
                assert asyncio.get_running_loop().time() - started < 2.5
                assert (await a.presence("chat:1")).users == []
                assert await a.user_connections(["carol"]) == {"carol": 0}
                assert [n.name for n in await a.nodes()] == ["a"]

        run(scenario())
    finally:
        node.kill()
        node.wait()
        if node.stdout is not None:
            node.stdout.close()


def test_concurrent_publishes_share_round_trips_and_keep_their_order(
    own_redis: RedisServer,
) -> None:
    harness = Harness("redis", own_redis)

    async def scenario() -> None:
        async with harness.started("a") as (a, sink):
            await a.subscribe("r")
            await a.publish("r", b"{}", history=KEEP)
            own_redis.command("CONFIG", "RESETSTAT")
            # Handed over in this order, all before the first is answered.
            results = await asyncio.gather(*(
                a.publish("r", b'{"n":%d}' % n, history=KEEP) for n in range(50)
            ))
            assert [r.offset for r in results] == list(range(2, 52))
            await sink.wait(lambda: len(sink.publications) == 51)
            assert [p.offset for p in sink.publications] == list(range(1, 52))
            assert all(b'"n":%d' % n in payload
                       for n, payload in enumerate(sink.payloads("r")[1:]))
            info = own_redis.command("INFO", "commandstats")
            assert info["cmdstat_evalsha"]["calls"] == 50
            assert "cmdstat_script|exists" not in info

    run(scenario())


def test_a_publish_after_redis_lost_its_scripts_loads_them_again(
    own_redis: RedisServer,
) -> None:
    harness = Harness("redis", own_redis)

    async def scenario() -> None:
        async with harness.started("a") as (a, sink):
            await a.subscribe("r")
            await a.publish("r", b'{"n":1}', history=KEEP)
            own_redis.command("SCRIPT", "FLUSH")  # as a restart without persistence does
            results = await asyncio.gather(
                a.publish("r", b'{"n":2}', history=KEEP), a.publish("r", b'{"n":3}', history=KEEP)
            )
            assert [r.offset for r in results] == [2, 3]
            await sink.wait(lambda: len(sink.publications) == 3)
            assert [p.offset for p in sink.publications] == [1, 2, 3]

    run(scenario())
