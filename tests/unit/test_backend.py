"""Backend (the proxies' core) over an HTTP client that answers from memory: no socket.

The answers are what a backend could send; the real client and a real
backend are in tests/integration/test_backend_*.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from tests.support.aio import run
from tests.support.metrics import value
from tests.support.waiting import until
from wsserver.backend import PROXY_KEY_HEADER, Backend
from wsserver.config import Secret
from wsserver.errors import BackendError, BackendRefused, BackendUnavailable, Unavailable
from wsserver.metrics import Metrics
from wsserver.outbound import HttpAnswer, HttpFailure

URLS = {kind: f"http://app.internal/ws/{kind}" for kind in ("connect", "subscribe", "publish",
                                                              "rpc")}
COOKIE = "session=s3cr3t-cookie-value"


class MemoryHttp:
    """An HTTP client whose answers a test function computes; records what was sent."""

    def __init__(self, answer: Callable[[str, Any], Any]) -> None:
        self.answer = answer
        self.sent: list[tuple[str, Any, dict[str, str]]] = []
        self.gate: asyncio.Event | None = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str],
                   timeout: float) -> HttpAnswer:
        decoded = json.loads(body)
        self.sent.append((url, decoded, dict(headers)))
        if self.gate is not None:
            await self.gate.wait()
        result = self.answer(url, decoded)
        if isinstance(result, HttpAnswer):
            return result
        if isinstance(result, BaseException):
            raise result
        return HttpAnswer(200, json.dumps(result).encode())

    async def get(self, url: str, timeout: float) -> HttpAnswer:
        raise AssertionError("not used")

    async def close(self) -> None:
        pass


def backend_with(answer: Callable[[str, Any], Any], **kw: Any) -> tuple[Backend, MemoryHttp,
                                                                       Metrics]:
    http = MemoryHttp(answer)
    metrics = Metrics()
    kw.setdefault("wall", lambda: 1_000_000.0)
    return Backend(URLS, http, metrics, **kw), http, metrics


def headers_of(names: dict[str, str]) -> Callable[[str], str | None]:
    lowered = {k.lower(): v for k, v in names.items()}
    return lambda name: lowered.get(name.lower())


def test_connect_sends_only_the_named_headers_and_the_key() -> None:
    async def scenario() -> None:
        backend, http, metrics = backend_with(
            lambda url, body: {"result": {"user": "alice", "expires_at": 1_000_600,
                                          "rooms": ["chat:*"], "publish": ["chat:1"]}},
            key=Secret("k" * 32), header_names=("Cookie", "Authorization"))
        identity = await backend.connect(
            "websocket", "10.0.0.1", "https://app.example",
            headers_of({"cookie": COOKIE, "X-Forwarded-For": "1.2.3.4", "User-Agent": "x"}))
        assert identity.user == "alice" and identity.expires_at == 1_000_600
        assert identity.grants.can_join("chat:9") and identity.grants.can_publish("chat:1")
        assert not identity.grants.can_publish("chat:2")
        ((url, body, headers),) = http.sent
        assert url == URLS["connect"]
        assert body == {"transport": "websocket", "addr": "10.0.0.1",
                        "origin": "https://app.example", "headers": {"Cookie": COOKIE}}
        assert headers[PROXY_KEY_HEADER] == "k" * 32
        assert headers["Content-Type"] == "application/json"
        assert value(metrics.proxy_requests, kind="connect", outcome="ok") == 1

    run(scenario)


def test_connect_without_expiry_never_ends_and_without_key_sends_no_key_header() -> None:
    async def scenario() -> None:
        backend, http, _ = backend_with(lambda url, body: {"result": {"user": "bob"}})
        identity = await backend.connect("websocket", "a", None, headers_of({}))
        assert identity.expires_at == math.inf
        assert PROXY_KEY_HEADER not in http.sent[0][2]
        assert http.sent[0][1]["headers"] == {}

    run(scenario)


@pytest.mark.parametrize(
    ("refusal", "code", "reason"),
    [
        ({"code": 4010, "reason": "banned"}, 4010, "banned"),
        ({"code": 1000, "reason": "x"}, 4003, "x"),
        ({"code": True}, 4003, "refused by the application"),
        ({"reason": "é" * 100}, 4003, "é" * 61),
    ],
)
def test_a_disconnect_is_a_403_with_a_close_code_and_a_short_reason(
    refusal: dict[str, Any], code: int, reason: str
) -> None:
    async def scenario() -> None:
        backend, _, metrics = backend_with(lambda url, body: {"disconnect": refusal})
        with pytest.raises(BackendRefused) as caught:
            await backend.connect("websocket", "a", None, headers_of({}))
        assert caught.value.status == 403
        assert caught.value.code == code and caught.value.message == reason
        assert value(metrics.proxy_requests, kind="connect", outcome="refused") == 1

    run(scenario)


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (HttpAnswer(500, b"oops"), "error"),
        (HttpAnswer(302, b""), "error"),
        (HttpAnswer(200, b"<html>"), "invalid"),
        (HttpAnswer(200, b"[1]"), "invalid"),
        ({"neither": 1}, "invalid"),
        ({"result": {"user": ""}}, "invalid"),
        ({"result": {"user": "a", "expires_at": "tomorrow"}}, "invalid"),
        ({"result": {"user": "a", "publish": [3]}}, "invalid"),
        (HttpFailure("ClientConnectorError: cannot connect"), "error"),
    ],
)
def test_anything_else_is_a_503(answer: Any, outcome: str) -> None:
    async def scenario() -> None:
        backend, _, metrics = backend_with(lambda url, body: answer)
        with pytest.raises(BackendUnavailable) as caught:
            await backend.connect("websocket", "a", None, headers_of({"Cookie": COOKIE}))
        assert caught.value.status == 503 and caught.value.retry_after
        assert value(metrics.proxy_requests, kind="connect", outcome=outcome) == 1

    run(scenario)


def test_a_past_expiry_is_refused_as_expired() -> None:
    async def scenario() -> None:
        backend, _, _ = backend_with(
            lambda url, body: {"result": {"user": "a", "expires_at": 999_999}})
        with pytest.raises(BackendRefused) as caught:
            await backend.connect("websocket", "a", None, headers_of({}))
        assert caught.value.code == 4001

    run(scenario)


def test_a_slow_backend_times_out_and_nothing_sent_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        backend, http, metrics = backend_with(lambda url, body: {"result": {}}, timeout=0.05)
        http.gate = asyncio.Event()  # never set: the backend hangs
        with pytest.raises(BackendUnavailable):
            await backend.connect("websocket", "a", None, headers_of({"Cookie": COOKIE}))
        with pytest.raises(Unavailable):
            await backend.rpc("alice", "m", {"card": "4111-1111"})
        assert value(metrics.proxy_requests, kind="connect", outcome="timeout") == 1
        assert value(metrics.proxy_requests, kind="rpc", outcome="timeout") == 1
        assert backend.in_flight("connect") == 0

    with caplog.at_level(logging.DEBUG):
        run(scenario)
    text = caplog.text
    assert "connect proxy http://app.internal/ws/connect: no answer within 0.05 s" in text
    assert "s3cr3t" not in text and "4111" not in text


def test_beyond_the_bound_a_call_is_refused_at_once_per_kind() -> None:
    async def scenario() -> None:
        backend, http, metrics = backend_with(lambda url, body: {"result": {"data": 1}},
                                              max_concurrency=2)
        http.gate = asyncio.Event()
        waiting = [asyncio.ensure_future(backend.rpc("u", "m", None)) for _ in range(2)]
        await until(lambda: len(http.sent) == 2)
        assert backend.in_flight("rpc") == 2
        with pytest.raises(Unavailable):
            await backend.rpc("u", "m", None)  # at once: no third request was sent
        assert len(http.sent) == 2
        assert value(metrics.proxy_requests, kind="rpc", outcome="overloaded") == 1
        # Another kind has its own share.
        subscribe = asyncio.ensure_future(backend.subscribe("u", "r"))
        await until(lambda: len(http.sent) == 3)
        assert backend.in_flight("subscribe") == 1
        http.gate.set()
        assert [await w for w in waiting] == [1, 1]
        await subscribe
        assert backend.in_flight("rpc") == 0

    run(scenario)


def test_subscribe_publish_rpc_answers() -> None:
    answers: dict[str, Any] = {
        URLS["subscribe"]: {"error": {"code": "banned", "message": "go away"}},
        URLS["publish"]: {"result": {"data": {"text": "clean"}}},
        URLS["rpc"]: {"error": {"code": "Not A Code!", "message": 5}},
    }

    async def scenario() -> None:
        backend, http, metrics = backend_with(lambda url, body: answers[url])
        with pytest.raises(BackendError) as caught:
            await backend.subscribe("alice", "team:1", {"note": 1})
        assert (caught.value.code, caught.value.message) == ("banned", "go away")
        assert await backend.publish("alice", "r", {"text": "dirty"}) == {"text": "clean"}
        answers[URLS["publish"]] = {"result": {}}
        assert await backend.publish("alice", "r", [1]) == [1]
        with pytest.raises(BackendError) as caught:
            await backend.rpc("alice", "m", None)
        assert caught.value.as_reply() == {"type": "error", "code": "forbidden",
                                           "message": "refused by the application"}
        assert [body for _, body, _ in http.sent] == [
            {"user": "alice", "room": "team:1", "data": {"note": 1}},
            {"user": "alice", "room": "r", "data": {"text": "dirty"}},
            {"user": "alice", "room": "r", "data": [1]},
            {"user": "alice", "method": "m", "data": None}]
        assert value(metrics.proxy_requests, kind="subscribe", outcome="refused") == 1
        assert value(metrics.proxy_requests, kind="publish", outcome="ok") == 2

    run(scenario)
