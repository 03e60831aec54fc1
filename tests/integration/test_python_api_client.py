"""wsserver.client.api against real servers: every endpoint, the key, retries and
idempotency keys (a lost answer through a real relay, a stopped Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.aio import run
from tests.support.cluster import KEY, node_args, write_files
from tests.support.metrics import value as metric
from tests.support.redis_server import RedisServer
from tests.support.relay import Relay
from tests.support.servers import RunningServer
from tests.support.tokens import mint
from tests.support.waiting import until
from wsserver.client import Client, Closed
from wsserver.client.api import ApiClient
from wsserver.client.errors import ApiBadRequest, ApiUnauthorized, ApiUnavailable, EpochChanged

ROOM = "chat:1"
StartServer = Callable[..., RunningServer]


@pytest.fixture
def start(run_server: StartServer, tmp_path: Path) -> StartServer:
    """``start(broker, *extra)``: a node with the cluster tests' rooms and key."""
    config, key = write_files(tmp_path / "files")

    def start_node(broker: str = "memory", *extra: str) -> RunningServer:
        return run_server(*node_args(broker, "a", config, key, *extra))

    return start_node


def test_a_publish_whose_answer_was_lost_is_retried_with_the_same_key_and_published_once(
    start: StartServer,
) -> None:
    node = start()

    async def scenario() -> None:
        async with Relay(node.port) as relay, \
                ApiClient(relay.url, KEY, random=lambda: 0.0) as api, \
                ApiClient(node.url, KEY) as direct:
            relay.lose_answers(1)  # the first POST is served, its answer never arrives
            answer = await api.publish(ROOM, "once")
            assert api.attempts == 2
            assert relay.accepted == 2
            history = await direct.history(ROOM)
            assert [m.data for m in history.messages] == ["once"]
            # The retry was answered with the first publish's result.
            assert answer == {"offset": 1, "epoch": history.epoch}

    run(scenario)


def test_every_endpoint_against_a_real_server(start: StartServer) -> None:
    node = start()

    async def scenario() -> None:
        async with ApiClient(node.url, KEY) as api, \
                Client(node.ws_url, token=mint("alice")) as alice:
            await alice.join(ROOM)
            first = await api.publish(ROOM, {"n": 1})
            await api.publish(ROOM, {"n": 2})
            results = await api.broadcast([ROOM, "lobby"], {"n": 3})
            assert results[0]["offset"] == 3 and results[1] == {}
            history = await api.history(ROOM, since=1)
            assert ([m.data for m in history.messages], history.offset, history.complete) == (
                [{"n": 2}, {"n": 3}], 3, True)
            assert [m.offset for m in history.messages] == [2, 3]
            assert (await api.history(ROOM, limit=1)).messages[0].offset == 1
            with pytest.raises(EpochChanged) as moved:
                await api.history(ROOM, since=1, epoch=first["epoch"] + "-old")
            assert (moved.value.status, moved.value.code) == (409, "epoch")
            presence = await api.presence(ROOM)
            assert (presence.users, presence.connections) == (["alice"], 1)
            with pytest.raises(ApiBadRequest):
                await api.presence("lobby")  # the default namespace has no presence
            assert (await api.rooms())[ROOM] == {"connections": 1, "users": 1}
            [only] = await api.nodes()
            assert only["name"] == "a" and only["connections"] == 1
            await api.disconnect("alice")
            with pytest.raises(Closed) as stopped:
                await alice.wait_closed()
            assert stopped.value.code == 4003
            assert api.attempts == 1

    run(scenario)


def test_a_wrong_key_is_unauthorized_and_not_retried(start: StartServer) -> None:
    node = start()

    async def scenario() -> None:
        async with ApiClient(node.url, "not-the-key-0123456789-abcdefghijklmnop") as api:
            with pytest.raises(ApiUnauthorized) as refused:
                await api.nodes()
            assert refused.value.status == 401
            assert api.attempts == 1

    run(scenario)


@pytest.mark.slow
def test_unavailable_is_retried_until_the_broker_is_back(
    start: StartServer, redis: RedisServer
) -> None:
    node = start(redis.url)
    node.wait_for_log(r"broker: Redis at \S+ is up")

    def unavailable() -> float:
        return metric(node.metrics(), "wsserver_api_requests_total", endpoint="publish",
                      outcome="unavailable") or 0.0

    async def scenario() -> None:
        redis.stop()
        async with ApiClient(node.url, KEY, retries=1, random=lambda: 0.0) as api:
            with pytest.raises(ApiUnavailable) as down:
                await api.publish(ROOM, "lost")
            assert (down.value.status, api.attempts) == (503, 2)
            assert unavailable() == 2
        async with ApiClient(node.url, KEY, retries=20) as api:
            publish = asyncio.create_task(api.publish(ROOM, "kept"))
            await until(lambda: unavailable() >= 3, timeout=10)
            redis.start()
            answer = await asyncio.wait_for(publish, 30)
            assert api.attempts >= 2
            history = await api.history(ROOM)
            assert [m.data for m in history.messages] == ["kept"]
            assert answer["offset"] == history.offset

    run(scenario, timeout=90)
