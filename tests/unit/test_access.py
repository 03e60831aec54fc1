"""RoomAccess: policy, subscription tokens and the backend, without sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.aio import run
from tests.support.tokens import SECRET, mint
from wsserver.access import RoomAccess
from wsserver.auth import Identity, TokenVerifier
from wsserver.backend import Backend
from wsserver.errors import Forbidden
from wsserver.metrics import Metrics
from wsserver.outbound import HttpAnswer
from wsserver.rooms import NO_GRANTS, RoomPolicy


@dataclass(eq=False)
class Member:
    identity: Identity | None


class OutOfOrderBackend:
    """Answers each publish when the test releases it, in any order it likes."""

    def __init__(self) -> None:
        self.pending: dict[Any, asyncio.Event] = {}

    async def post(self, url: str, body: bytes, headers: Mapping[str, str],
                   timeout: float) -> HttpAnswer:
        data = json.loads(body)["data"]
        gate = self.pending[data] = asyncio.Event()
        await gate.wait()
        return HttpAnswer(200, json.dumps({"result": {"data": f"ok {data}"}}).encode())

    async def get(self, url: str, timeout: float) -> HttpAnswer:
        raise AssertionError("not used")

    async def close(self) -> None:
        pass


POLICY = RoomPolicy.from_table({
    "join": "token", "publish": "token",
    "namespaces": {"mod": {"join": "anyone", "publish": "proxy"},
                   "sys": {"join": "none", "publish": "none"}},
})


def access_with(http: Any = None) -> RoomAccess:
    metrics = Metrics()
    backend = None if http is None else Backend({"publish": "http://b/p"}, http, metrics,
                                                timeout=5)
    return RoomAccess(POLICY, TokenVerifier(SECRET, ["HS256"]), metrics, backend)


def test_proxied_publishes_are_released_in_the_order_they_came() -> None:
    async def scenario() -> None:
        http = OutOfOrderBackend()
        access = access_with(http)
        alice = Member(Identity("alice", 2**40))
        released: list[Any] = []

        async def publish(n: int) -> None:
            released.append(await access.check_publish(alice, "mod:1", n))

        tasks = [asyncio.ensure_future(publish(n)) for n in range(5)]
        while len(http.pending) < 5:
            await asyncio.sleep(0)
        for n in (4, 2, 3, 0, 1):  # the backend answers out of order
            http.pending[n].set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert released == [f"ok {n}" for n in range(5)]

    run(scenario)


def test_a_subscription_token_grants_join_and_publish_until_the_member_leaves() -> None:
    async def scenario() -> None:
        access = access_with()
        alice = Member(Identity("alice", 2**40, NO_GRANTS))
        with pytest.raises(Forbidden):
            await access.check_join(alice, "secret")
        await access.check_join(alice, "secret", mint("alice", room="secret", publish=True))
        assert await access.check_publish(alice, "secret", 1) == 1
        assert access.may_stay(alice, "secret")
        access.forget_room(alice, "secret")
        assert not access.may_stay(alice, "secret")
        with pytest.raises(Forbidden):
            await access.check_publish(alice, "secret", 1)
        # "none" stays none, token or not.
        with pytest.raises(Forbidden):
            await access.check_join(alice, "sys:x", mint("alice", room="sys:x"))

    run(scenario)
