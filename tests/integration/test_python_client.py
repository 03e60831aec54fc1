"""wsserver.client against real servers: processes, Redis, and real faults.

Each scenario runs the client on a fresh event loop against ``python -m
wsserver`` processes (``run_server``), with a real ``redis-server`` where the
scenario is about the Redis broker, and a real TCP relay (``tests.support.relay``)
where the network must fail. Messages are published through the server API
(``wsserver.client.api``) while the client follows a room; the checks are the
promise: every message exactly once, in order, or a :class:`Gap` in its place.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.aio import run
from tests.support.backend import AppBackend
from tests.support.cluster import KEY, node_args, write_files
from tests.support.cluster import ROOMS as CLUSTER_ROOMS
from tests.support.redis_server import RedisServer
from tests.support.relay import Relay
from tests.support.servers import NO_HANDSHAKE_LIMIT, RunningServer
from tests.support.tokens import mint
from tests.support.waiting import until
from wsserver.client import (
    BadRequest,
    Client,
    Closed,
    Forbidden,
    Gap,
    Message,
    RateLimited,
    Room,
    ServerError,
    Unavailable,
    UnknownTask,
    UnknownType,
)
from wsserver.client.api import ApiClient

ROOM = "chat:1"
WAIT = 20.0
#: Client publishes are not what these tests are about unless they say so.
FAST = ("--message-rate", "100000", "--message-burst", "100000",
        "--room-publish-rate", "100000", "--room-publish-burst", "100000")

StartServer = Callable[..., RunningServer]


#: The cluster tests' rooms (``chat:*`` with history, presence and join/leave
#: events; the default namespace open), a namespace nobody may join, and one
#: with a long history.
ROOMS = CLUSTER_ROOMS + """
[rooms.namespaces.locked]
join = "none"

[rooms.namespaces.feed]
join = "anyone"
publish = "members"
history_size = 1000
"""


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """The rooms config and the API key file."""
    config, key = write_files(tmp_path / "files")
    config.write_text(ROOMS)
    return config, key


@pytest.fixture
def start(run_server: StartServer, files: tuple[Path, Path]) -> StartServer:
    """``start(broker, name, *extra)``: a node with the shared config and key."""
    config, key = files

    def start_node(broker: str, name: str = "a", *extra: str) -> RunningServer:
        node = run_server(*node_args(broker, name, config, key, *NO_HANDSHAKE_LIMIT, *extra))
        if broker != "memory":
            node.wait_for_log(r"broker: Redis at \S+ is up")
        return node

    return start_node


async def take(room: Room, count: int, timeout: float = WAIT) -> list[Message | Gap]:
    """The room's next items until ``count`` messages came (gaps kept, in place)."""
    items: list[Message | Gap] = []
    async with asyncio.timeout(timeout):
        while sum(isinstance(i, Message) for i in items) < count:
            items.append(await anext(room))
    return items


def datas(items: list[Message | Gap]) -> list[Any]:
    """The data of each message, and ``("gap", kind)`` for each gap, in order."""
    return [i.data if isinstance(i, Message) else ("gap", i.kind) for i in items]


async def publish_all(api: ApiClient, values: range, every: float = 0.0) -> None:
    for value in values:
        await api.publish(ROOM, value)
        if every:
            await asyncio.sleep(every)


# --- requests ---------------------------------------------------------------------------


def test_requests_answer_and_refusals_raise_typed_errors(start: StartServer) -> None:
    node = start("memory")

    async def scenario() -> None:
        async with Client(node.ws_url, token=mint("alice")) as client:
            assert client.user == "alice"
            assert await client.echo({"n": [1, 2]}) == {"n": [1, 2]}
            await client.ping()
            assert await client.task("primes", {"limit": 100}) == 25
            with pytest.raises(BadRequest) as bad:
                await client.task("primes", {"limit": -1})
            assert bad.value.code == "bad_request"
            with pytest.raises(UnknownTask):
                await client.task("nope", {})
            room = await client.join(ROOM)
            presence = await room.presence()
            assert (presence.users, presence.connections) == (["alice"], 1)
            with pytest.raises(Forbidden) as refused:
                await client.join("locked:1")
            assert refused.value.code == "forbidden"
            ack = await room.publish({"text": "hi"}, idempotency_key="k1")
            assert (ack.sender, ack.data, ack.offset, ack.duplicate) == (
                "alice", {"text": "hi"}, 1, False)
            [item] = await take(room, 1)
            assert isinstance(item, Message) and item.offset == 1
            again = await room.publish({"text": "hi"}, idempotency_key="k1")
            assert (again.sender, again.data, again.offset, again.duplicate) == (
                "alice", {"text": "hi"}, 1, True)
            assert (await room.publish("next")).offset == 2  # nothing came between
            [item] = await take(room, 1)
            assert isinstance(item, Message) and (item.data, item.offset) == ("next", 2)
            # This server has no --proxy-rpc-url: rpc is unknown_type, typed.
            with pytest.raises(UnknownType) as unknown:
                await client.rpc("add", {"a": 1})
            assert unknown.value.code == "unknown_type"

    run(scenario)


def test_rpc_is_answered_by_the_applications_backend(
    start: StartServer, app_backend: AppBackend
) -> None:
    node = start("memory", "a", *app_backend.proxy_args("rpc"), "--proxy-timeout", "0.5")

    async def scenario() -> None:
        async with Client(node.ws_url, token=mint("alice")) as client:
            assert await client.rpc("whoami") == {"user": "alice"}
            assert await client.rpc("add", [1, 2, 3]) == 6
            with pytest.raises(ServerError) as refused:
                await client.rpc("fail", {"order": 7})
            assert (type(refused.value), refused.value.code) == (ServerError, "not_found")
            app_backend.fault("rpc", "hang")
            with pytest.raises(Unavailable) as down:
                await client.rpc("whoami")
            assert down.value.retry_after is not None
            app_backend.release_hanging()
        assert [call.body["method"] for call in app_backend.calls_of("rpc")] == [
            "whoami", "add", "fail", "whoami"]

    run(scenario)


# --- reconnecting and recovering --------------------------------------------------------


@pytest.mark.slow
def test_a_killed_node_restarted_on_its_port_is_rejoined_and_nothing_is_missed(
    start: StartServer, redis: RedisServer
) -> None:
    a = start(redis.url, "a")
    b = start(redis.url, "b")  # the API publishes through b while a is down
    port = a.port

    async def scenario() -> None:
        async with ApiClient(b.url, KEY) as api, \
                Client(a.ws_url, token=mint("alice")) as client:
            room = await client.join(ROOM)
            await publish_all(api, range(1, 6))
            got = await take(room, 5)
            a.proc.kill()
            a.proc.wait()
            await publish_all(api, range(6, 11))  # missed while a is down
            restarted = start(redis.url, "a", "--port", str(port))
            assert restarted.port == port
            await until(lambda: client.connections == 2, timeout=WAIT)
            await publish_all(api, range(11, 16))
            got += await take(room, 10)
        assert datas(got) == list(range(1, 16))
        assert [i.offset for i in got if isinstance(i, Message)] == list(range(1, 16))

    run(scenario)


@pytest.mark.slow
def test_a_node_killed_mid_stream_the_client_moves_to_the_other_and_misses_nothing(
    start: StartServer, redis: RedisServer
) -> None:
    a = start(redis.url, "a")
    b = start(redis.url, "b")

    async def scenario() -> None:
        async with ApiClient(b.url, KEY) as api, \
                Client([a.ws_url, b.ws_url], token=mint("alice")) as client:
            room = await client.join(ROOM)
            publisher = asyncio.create_task(publish_all(api, range(1, 61), every=0.01))
            got = await take(room, 15)
            a.proc.kill()  # while the publisher goes on through b
            got += await take(room, 45)
            await publisher
        assert datas(got) == list(range(1, 61))
        assert client.connections == 2
        assert client.last_close is not None and client.last_close[0] is None  # no close frame

    run(scenario)


@pytest.mark.slow
def test_a_paced_drain_1012_moves_the_client_to_another_node_and_misses_nothing(
    start: StartServer, redis: RedisServer
) -> None:
    a = start(redis.url, "a", "--drain-rate", "5")
    b = start(redis.url, "b")

    async def scenario() -> None:
        async with ApiClient(b.url, KEY) as api, \
                Client([a.ws_url, b.ws_url], token=mint("alice")) as client:
            room = await client.join(ROOM)
            publisher = asyncio.create_task(publish_all(api, range(1, 41), every=0.01))
            got = await take(room, 10)
            a.proc.terminate()  # SIGTERM: a drains, closing its connections with 1012
            got += await take(room, 30)
            await publisher
            assert client.last_close is not None and client.last_close[0] == 1012
            assert client.connections == 2
        assert datas(got) == list(range(1, 41))
        assert a.proc.wait(30) == 0

    run(scenario)


@pytest.mark.slow
def test_a_restart_that_lost_the_history_is_reported_not_passed_over(
    start: StartServer,
) -> None:
    """Memory broker: the restarted server has a new epoch, so the re-join is
    answered ``recovered: false``; the room says so in place, and the callback runs."""
    node = start("memory")
    port = node.port
    reported: list[Gap] = []

    async def scenario() -> None:
        async with Client(node.ws_url, token=mint("alice"),
                          on_recovery_failed=reported.append) as client:
            room = await client.join(ROOM)
            async with ApiClient(node.url, KEY) as api:
                await publish_all(api, range(1, 4))
            got = await take(room, 3)
            node.stop()
            restarted = start("memory", "a", "--port", str(port))
            await until(lambda: client.connections == 2, timeout=WAIT)
            async with ApiClient(restarted.url, KEY) as api:
                await publish_all(api, range(4, 6))
            got += await take(room, 2)
        assert datas(got) == [1, 2, 3, ("gap", "recovery_failed"), 4, 5]
        assert len(reported) == 1 and reported[0].kind == "recovery_failed"
        assert client.last_close is not None and client.last_close[0] == 1001  # shutting down

    run(scenario)


@pytest.mark.slow
def test_a_dropped_connection_is_resumed_with_since_and_nothing_is_missed(
    start: StartServer,
) -> None:
    node = start("memory")

    async def scenario() -> None:
        async with Relay(node.port) as relay, ApiClient(node.url, KEY) as api, \
                Client(relay.ws_url, token=mint("alice")) as client:
            room = await client.join(ROOM)
            await publish_all(api, range(1, 11))
            got = await take(room, 10)
            relay.refusing = True
            assert relay.cut() == 1  # both sockets reset, no close frame
            await publish_all(api, range(11, 21))  # missed while the network is down
            relay.refusing = False
            publisher = asyncio.create_task(publish_all(api, range(21, 41), every=0.01))
            got += await take(room, 30)
            await publisher
            assert relay.accepted == 2
        assert datas(got) == list(range(1, 41))
        assert client.connections == 2

    run(scenario)


# --- tokens -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_token_about_to_expire_is_refreshed_in_band_and_the_connection_stays(
    start: StartServer,
) -> None:
    node = start("memory", "a", "--jwt-leeway", "0")
    minted: list[float] = []

    def fresh_token() -> str:
        minted.append(time.monotonic())
        return mint("alice", ttl=4)

    async def scenario() -> None:
        async with ApiClient(node.url, KEY) as api, \
                Client(node.ws_url, token_refresh=fresh_token) as client:
            room = await client.join(ROOM)
            # token_expiring comes halfway through a 4 s token: two refreshes in ~4 s.
            await until(lambda: len(minted) >= 3, timeout=WAIT)
            first_expiry = minted[0] + 4
            await until(lambda: time.monotonic() > first_expiry + 0.5, timeout=WAIT)
            await api.publish(ROOM, "after the first token expired")
            [item] = await take(room, 1)
            assert isinstance(item, Message) and item.data == "after the first token expired"
            assert client.connections == 1
            assert client.last_close is None

    run(scenario)


@pytest.mark.slow
def test_an_expired_token_closes_4001_and_the_client_comes_back_with_a_new_one(
    start: StartServer,
) -> None:
    """The refresh fails (the identity provider is down): the server sends
    token_expiring, then closes with 4001 at expiry; the client asks for a
    token again, reconnects and resumes the room with ``since``."""
    node = start("memory", "a", "--jwt-leeway", "0")
    calls: list[str] = []

    async def fresh_token() -> str:
        calls.append("refresh")
        if len(calls) == 1:
            raise ConnectionError("identity provider down")
        return mint("alice", ttl=600)

    async def scenario() -> None:
        async with ApiClient(node.url, KEY) as api, \
                Client(node.ws_url, token=mint("alice", ttl=8),
                       token_refresh=fresh_token) as client:
            room = await client.join(ROOM)
            await publish_all(api, range(1, 4))
            got = await take(room, 3)
            await until(lambda: client.last_close is not None, timeout=WAIT)
            await publish_all(api, range(4, 7))
            got += await take(room, 3)
            assert client.last_close is not None and client.last_close[0] == 4001
            assert client.connections == 2
        assert calls == ["refresh", "refresh"]
        assert datas(got) == list(range(1, 7))

    run(scenario)


# --- stopping -------------------------------------------------------------------------------


def test_a_disconnect_by_the_server_4003_stops_the_client_and_raises(
    start: StartServer,
) -> None:
    node = start("memory")

    async def scenario() -> None:
        async with ApiClient(node.url, KEY) as api, \
                Client(node.ws_url, token=mint("alice")) as client:
            room = await client.join(ROOM)
            await api.disconnect("alice")
            with pytest.raises(Closed) as stopped:
                await take(room, 1)
            assert stopped.value.code == 4003
            with pytest.raises(Closed):
                await client.wait_closed()
            assert client.state == "stopped"
            with pytest.raises(Closed):
                await client.echo("anyone there?")
            # The connection loop ended: no reconnect is attempted.
            assert client.connections == 1

    run(scenario)


# --- back-pressure and pacing ------------------------------------------------------------


def test_publishing_faster_than_the_server_answers_waits_and_keeps_order(
    start: StartServer,
) -> None:
    node = start("memory", "a", *FAST)
    count, window = 1000, 8

    async def scenario() -> None:
        async with Client(node.ws_url, token=mint("alice"), max_in_flight=window) as sender, \
                Client(node.ws_url, token=mint("bob")) as reader:
            watched = await reader.join(ROOM)
            room = await sender.join(ROOM)
            peak = 0
            done = False

            async def watch() -> None:
                nonlocal peak
                while not done:
                    peak = max(peak, sender.in_flight)
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            acks = await asyncio.gather(*(room.publish(n) for n in range(count)))
            done = True
            await watcher
            # Every publish went through, in the order it was called.
            offsets = [ack.offset for ack in acks]
            assert offsets[0] is not None
            assert offsets == list(range(offsets[0], offsets[0] + count))
            assert [ack.data for ack in acks] == list(range(count))
            # The callers were held at the window, never past it.
            assert peak == window
            # The other member got them all, in order.
            assert datas(await take(watched, count)) == list(range(count))

    run(scenario)


def test_messages_are_paced_to_the_users_bucket_instead_of_refused(
    start: StartServer,
) -> None:
    node = start("memory", "a", "--message-rate", "50", "--message-burst", "5")
    count = 40

    async def scenario() -> None:
        async with Client(node.ws_url, token=mint("alice")) as client:
            began = time.monotonic()
            for n in range(count):
                assert await client.echo(n) == n
            elapsed = time.monotonic() - began
            # 5 at once less a reserve of 2, then 45/s (10 % under the rate).
            assert elapsed >= (count - 3) / 45 - 0.05
        # Without pacing, the same messages sent at once are refused past the burst.
        async with Client(node.ws_url, token=mint("carol"), pace=False) as client:
            answers = await asyncio.gather(*(client.echo(n) for n in range(count)),
                                           return_exceptions=True)
            refused = [a for a in answers if isinstance(a, RateLimited)]
            assert refused and all(r.retry_after is not None for r in refused)

    run(scenario)


def test_a_full_server_is_retried_after_its_retry_after_and_close_cuts_the_wait_short(
    start: StartServer,
) -> None:
    node = start("memory", "a", "--max-connections", "1")

    async def scenario() -> None:
        async with Client(node.ws_url, token=mint("alice")):
            waiting = Client(node.ws_url, token=mint("bob"))
            connecting = asyncio.create_task(waiting.connect())
            await until(lambda: waiting.last_close is not None, timeout=WAIT)
            assert waiting.last_close is not None and waiting.last_close[0] == 503
            assert waiting.state == "connecting"  # waiting out Retry-After (5 s), not stopped
            began = time.monotonic()
            await waiting.close()
            assert time.monotonic() - began < 1.0
            with pytest.raises(Closed) as closed:
                await connecting
            assert closed.value.code is None  # closed by the caller

    run(scenario)


def test_callbacks_get_messages_and_events_in_order_and_leave_ends_the_room(
    start: StartServer,
) -> None:
    node = start("memory")
    events: list[dict[str, Any]] = []
    got: list[Any] = []

    async def on_message(message: Message) -> None:
        await asyncio.sleep(0)  # an async callback, one message at a time
        got.append(message.data)
        if message.data == 2:
            raise RuntimeError("a failing callback is logged, and delivery goes on")

    async def scenario() -> None:
        async with ApiClient(node.url, KEY) as api, \
                Client(node.ws_url, token=mint("alice"), on_event=events.append) as alice, \
                Client(node.ws_url, token=mint("bob")) as bob:
            room = await alice.join(ROOM, on_message=on_message)
            with pytest.raises(TypeError):
                aiter(room)
            await publish_all(api, range(1, 6))
            await until(lambda: len(got) == 5, timeout=WAIT)
            assert got == [1, 2, 3, 4, 5]
            bobs = await bob.join(ROOM)
            await until(lambda: len(events) == 2, timeout=WAIT)
            assert events == [{"type": "user_joined", "room": ROOM, "user": user}
                              for user in ("alice", "bob")]
            await bobs.leave()
            with pytest.raises(StopAsyncIteration):
                await anext(bobs)
            assert (await room.presence()).users == ["alice"]
            await room.leave()
            await room.wait_closed()
            assert ROOM not in await api.rooms()

    run(scenario)


def test_a_recovery_larger_than_the_write_bound_arrives_pending_and_in_order(
    start: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 3: what does not fit under ``--max-write-buffer`` follows the
    ``joined`` answer as ordinary messages (``"pending": N``); the client
    takes them by offset."""
    node = start("memory", "a", "--max-write-buffer", "8192")
    big = "x" * 1000

    async def scenario() -> None:
        async with Relay(node.port) as relay, ApiClient(node.url, KEY) as api, \
                Client(relay.ws_url, token=mint("alice")) as client:
            room = await client.join(ROOM)
            await api.publish(ROOM, [0, big])
            got = await take(room, 1)
            relay.refusing = True
            relay.cut()
            for n in range(1, 51):  # about 50 KB missed: six times the bound
                await api.publish(ROOM, [n, big])
            relay.refusing = False
            got += await take(room, 50)
            await api.publish(ROOM, [51, big])
            got += await take(room, 1)
        assert [item.data[0] if isinstance(item, Message) else item for item in got] == list(
            range(52))
        assert re.search(r"re-joined 'chat:1', recovered=True, 50 missed messages "
                         r"\([1-9]\d* pending after the answer\)", caplog.text)

    with caplog.at_level(logging.INFO, logger="wsserver.client"):
        run(scenario)


def test_a_consumer_far_behind_the_room_with_a_small_queue_misses_nothing(
    start: StartServer,
) -> None:
    """4 MB arrive while the consumer reads nothing and its room keeps 10
    items: the reader waits on the full queue instead of growing it or
    dropping, and the consumer then sees every message once, in order, on
    the same connection. (Loopback's socket buffers, up to 32 MB here, take
    the rest; the server's lagging of a slow member has its own tests.)"""
    node = start("memory")
    room_name, count, blob = "feed:1", 400, "x" * 10_000

    async def scenario() -> None:
        async with ApiClient(node.url, KEY) as api, \
                Client(node.ws_url, token=mint("alice"), max_queue=10) as client:
            room = await client.join(room_name)
            for n in range(count):
                await api.publish(room_name, [n, blob])
            await until(lambda: room.backlog == 10, timeout=WAIT)
            await asyncio.sleep(0.2)  # time to overfill it, if it could be
            assert room.backlog == 10
            seen = []
            async with asyncio.timeout(WAIT):
                while len(seen) < count:
                    item = await anext(room)
                    assert isinstance(item, Message), item
                    seen.append(item.data[0])
            assert seen == list(range(count))
            assert client.connections == 1

    run(scenario)
