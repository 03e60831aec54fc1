"""Nothing lost silently through real faults: two nodes on one real ``redis-server``.

A node killed with SIGKILL and restarted, Redis restarted with persistence
(``appendonly yes``) and without, Redis frozen with SIGSTOP for 3 s, and the
nodes' pub/sub connections killed (``CLIENT KILL TYPE pubsub``); all while a
publisher on ``POST /api/publish`` runs and a few clients churn. After each,
:meth:`tests.support.chaos.Chaos.finish` checks every client (every
acknowledged message delivered once in order, or inside a range it was told
about), the history (nothing stored twice) and ``/readyz`` (it went 503, or
the killed node stopped answering, and came back to 200). The last scenario
is a client's: publishes retried with their ``idempotency_key`` through a
freeze and a node kill land exactly once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.support.aio import run
from tests.support.chaos import PATIENCE, Chaos, Nodes
from tests.support.publisher import API_KEY
from tests.support.redis_server import RedisServer
from tests.support.tokens import mint
from tests.support.waiting import until
from wsserver.client import Client, ConnectionLost, Message, RequestTimeout, Room, Unavailable
from wsserver.client.api import ApiClient

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

#: A scenario takes 10-20 s; a loaded machine can make each of its steps take
#: seconds (every wait in it is bounded by tests.support.chaos.PATIENCE).
SCENARIO_TIMEOUT = 240.0


def test_a_node_killed_and_restarted(
    redis: RedisServer, nodes_factory: Callable[..., Nodes]
) -> None:
    """SIGKILL one of two nodes: its clients reconnect (to the other node first,
    then back) and recover with ``since``; the node comes back on its port."""
    nodes = nodes_factory(redis.url)

    async def scenario() -> None:
        await nodes.start(2)
        async with Chaos(nodes, "kill") as chaos:
            await chaos.start()
            chaos.churn(hoppers=2, passers=1)
            await chaos.published(100)
            chaos.mark("SIGKILL n1")
            await nodes.kill(1)
            await chaos.watch.until(1, "down")
            await chaos.published(100)
            chaos.mark("restarting n1")
            await nodes.restart(1)
            await chaos.watch.until(1, "200")
            chaos.mark("n1 ready")
            await chaos.published(100)
            (await chaos.finish(expect_down=[1])).assert_clean()

    run(scenario, SCENARIO_TIMEOUT)


@pytest.mark.parametrize("persistent", [True, False], ids=["appendonly", "no-persistence"])
def test_redis_restarted(
    persistent: bool, request: pytest.FixtureRequest, nodes_factory: Callable[..., Nodes]
) -> None:
    """Redis stopped for a second and started again. With persistence the rooms
    keep their epoch and members miss nothing; without, the history is gone:
    members are told with a ``gap`` that covers only the lost epoch."""
    redis: RedisServer = request.getfixturevalue("persistent_redis" if persistent else "redis")
    nodes = nodes_factory(redis.url)

    async def scenario() -> None:
        await nodes.start(2)
        async with Chaos(nodes, "restart") as chaos:
            await chaos.start()
            chaos.churn(hoppers=2, passers=1)
            await chaos.published(100)
            chaos.mark("stopping Redis")
            await asyncio.to_thread(redis.stop)
            for index in (0, 1):
                await chaos.watch.until(index, "503")
            chaos.mark("both nodes unready")
            # An outage long enough for the nodes' reconnect backoffs to part: one
            # node is back (and publishing) a while before the other re-subscribes.
            await asyncio.sleep(2.5)
            await asyncio.to_thread(redis.start)
            chaos.mark("Redis started")
            for index in (0, 1):
                await chaos.watch.until(index, "200")
            chaos.mark("both nodes ready")
            await chaos.published(100)
            (await chaos.finish(expect_unready=[0, 1])).assert_clean()

    run(scenario, SCENARIO_TIMEOUT)


def test_redis_frozen_for_three_seconds(
    redis: RedisServer, nodes_factory: Callable[..., Nodes]
) -> None:
    """SIGSTOP for 3 s: connections to Redis stay open and nothing answers; the
    nodes go unready, then repair what their members missed once it is back."""
    nodes = nodes_factory(redis.url)

    async def scenario() -> None:
        await nodes.start(2)
        async with Chaos(nodes, "freeze") as chaos:
            await chaos.start()
            chaos.churn(hoppers=2, passers=1)
            await chaos.published(100)
            chaos.mark("SIGSTOP Redis")
            redis.freeze()
            try:
                await asyncio.sleep(3.0)
                for index in (0, 1):
                    await chaos.watch.until(index, "503")
            finally:
                redis.thaw()
                chaos.mark("SIGCONT Redis")
            for index in (0, 1):
                await chaos.watch.until(index, "200")
            chaos.mark("both nodes ready")
            await chaos.published(100)
            (await chaos.finish(expect_unready=[0, 1])).assert_clean()

    run(scenario, SCENARIO_TIMEOUT)


def test_pubsub_connections_killed(
    redis: RedisServer, nodes_factory: Callable[..., Nodes]
) -> None:
    """``CLIENT KILL TYPE pubsub`` three times: each node re-subscribes and
    repairs the messages its subscription missed from the history."""
    nodes = nodes_factory(redis.url)

    async def scenario() -> None:
        await nodes.start(2)
        async with Chaos(nodes, "pubsub") as chaos:
            await chaos.start()
            chaos.churn(hoppers=2, passers=1)
            await chaos.published(60)
            for kill in range(1, 4):
                # Both subscribed (a node whose probe was late on a loaded machine
                # may be re-subscribing): the kill hits both.
                for index in (0, 1):
                    await chaos.watch.until(index, "200")
                killed = await asyncio.to_thread(redis.command, "CLIENT", "KILL", "TYPE", "pubsub")
                assert killed >= 2, killed
                chaos.mark(f"CLIENT KILL TYPE pubsub ({killed} killed)")
                await nodes.logged("broker: re-subscribed", kill)
                await chaos.published(60)
            (await chaos.finish()).assert_clean()

    run(scenario, SCENARIO_TIMEOUT)


#: Publishing lanes of the idempotency scenario: several publishes are on the
#: wire at once, so a freeze or a kill catches some in flight.
LANES = 4


def test_publishes_retried_with_their_idempotency_keys_land_once(
    redis: RedisServer, nodes_factory: Callable[..., Nodes]
) -> None:
    """A client (the Python client, on both nodes' URLs) publishes in four lanes,
    each publish with its own ``idempotency_key``, and sends it again with the
    same key until it is acknowledged: answered ``unavailable`` through a 3 s
    Redis freeze (some of those are applied once Redis runs again), and cut off
    when its node is SIGKILLed (it moves to the other node). The lanes publish
    before, through and after each fault. Every message is then in the room's
    history exactly once, each lane in order, and a member that stayed
    connected got each exactly once."""
    nodes = nodes_factory(redis.url, "--message-rate", "500", "--message-burst", "200",
                          "--room-publish-rate", "1000", "--room-publish-burst", "500")
    room_name = "chaos:idem"

    async def scenario() -> None:
        await nodes.start(2)
        first, second = nodes.running
        retried: Counter[str] = Counter()
        sent = [0] * LANES

        async def publish_once(room: Room, value: list[int]) -> None:
            key = f"{value[0]}.{value[1]}"
            while True:
                try:
                    await room.publish(value, idempotency_key=key, timeout=PATIENCE)
                    return
                except Unavailable as error:
                    retried["unavailable"] += 1
                    await asyncio.sleep(error.retry_after or 0.1)
                except (ConnectionLost, RequestTimeout) as error:
                    retried[type(error).__name__] += 1

        async def lane(room: Room, index: int, stop: asyncio.Event) -> None:
            while not stop.is_set():
                await publish_once(room, [index, sent[index]])
                sent[index] += 1

        async def through(room: Room, fault: Callable[[], Awaitable[None]]) -> None:
            """The lanes publish before ``fault`` (so each has a publish on the
            wire when it strikes) and go on until each got more through after it."""
            stop = asyncio.Event()
            lanes = asyncio.gather(*(lane(room, i, stop) for i in range(LANES)))
            before = list(sent)
            await until(lambda: all(n >= b + 3 for n, b in zip(sent, before, strict=True)), PATIENCE)
            await fault()
            after = list(sent)
            await until(lambda: all(n >= a + 3 for n, a in zip(sent, after, strict=True)), PATIENCE)
            stop.set()
            await lanes

        async def freeze() -> None:
            redis.freeze()
            try:
                await asyncio.sleep(3.0)
            finally:
                redis.thaw()

        async def kill() -> None:
            first.proc.kill()

        async with Client([first.ws_url, second.ws_url], token=mint("pub")) as publisher, \
                Client(second.ws_url, token=mint("member")) as member, \
                ApiClient(second.url, API_KEY) as api:
            watched = await member.join(room_name)
            room = await publisher.join(room_name)
            await through(room, freeze)
            await through(room, kill)
            await api.publish(room_name, "end")
            got: list[Any] = []
            async with asyncio.timeout(PATIENCE):
                async for item in watched:
                    assert isinstance(item, Message), item
                    if item.data == "end":
                        break
                    got.append(item.data)
            history = await api.history(room_name, limit=10_000)
        kept = [m.data for m in history.messages if m.data != "end"]
        assert retried["unavailable"] > 0, retried  # the freeze was felt
        assert retried["ConnectionLost"] > 0, retried  # and the kill
        for record in (kept, got):
            assert sorted(map(tuple, record)) == [
                (lane, n) for lane in range(LANES) for n in range(sent[lane])], (retried, sent)
            for index in range(LANES):
                assert [n for lane, n in record if lane == index] == list(range(sent[index]))

    run(scenario, SCENARIO_TIMEOUT)
