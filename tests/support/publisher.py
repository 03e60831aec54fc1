"""The backend's side of a chaos scenario: ``POST /api/publish`` as a careful
backend does it, and a watch on every node's ``/readyz``.

:class:`Publisher` sends each message with an idempotency key (the unique id
in its data) and retries it, same key, on the next node after a 503, a
refused or reset connection or a timeout; it records every acknowledged
``(epoch, offset)``. :class:`ReadyWatch` polls ``/readyz`` and keeps each
node's sequence of answers. Both share one :class:`Http` client in the
test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from tests.support.ledger import Ack, Epochs

API_KEY = "chaos-api-key-0123456789-abcdefghijklmnop"
#: How long one publish may be retried before it counts as never acknowledged.
PUBLISH_DEADLINE = 30.0
REQUEST_TIMEOUT = 3.0


class Http:
    """One AsyncHTTPClient for the scenario's API calls and readiness polls."""

    def __init__(self) -> None:
        self.client = AsyncHTTPClient(force_instance=True)
        #: Requests under way, also those whose caller was cancelled: Tornado
        #: closes a request's connection only when it ends (answered or timed out).
        self._requests: set[asyncio.Future[HTTPResponse]] = set()

    async def call(self, url: str, body: Any = None, timeout: float = REQUEST_TIMEOUT,
                   ) -> tuple[int, Any]:
        """(status, JSON body or None); 599 when nothing answered."""
        request = HTTPRequest(
            url, method="GET" if body is None else "POST",
            body=None if body is None else json.dumps(body),
            headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
            connect_timeout=timeout, request_timeout=timeout,
        )
        fetching = self.client.fetch(request, raise_error=False)
        self._requests.add(fetching)
        fetching.add_done_callback(self._requests.discard)
        try:
            # Shielded: a cancelled caller leaves the request to end (and close
            # its connection) by itself; aclose() waits for that.
            response: HTTPResponse = await asyncio.shield(fetching)
        except (OSError, HTTPClientError):
            # raise_error=False keeps only non-2xx answers: a connection refused,
            # reset (a killed node) or timed out still raises.
            return 599, None
        try:
            return response.code, json.loads(response.body) if response.body else None
        except ValueError:
            return response.code, None

    async def aclose(self) -> None:
        """Close the client once every request under way has ended (each is bounded
        by its timeout), so that none leaves its connection open."""
        await asyncio.gather(*self._requests, return_exceptions=True)
        self.client.close()


class Publisher:
    """``POST /api/publish`` as a careful backend does it: an idempotency key per
    message, retried (same key, the next node) on 503, timeouts and refusals."""

    def __init__(self, http: Http, urls: Sequence[str], rooms: Sequence[str], epochs: Epochs,
                 tag: str, size: int, on_ack: Callable[[], None] = lambda: None) -> None:
        self.http = http
        self.on_ack = on_ack
        self.urls = list(urls)
        self.epochs = epochs
        self.tag = tag
        self.size = size
        self.acked: dict[str, list[Ack]] = {room: [] for room in rooms}
        self.unacked: list[str] = []
        self.wrong: list[str] = []
        self.retries = 0
        self._serial = itertools.count()
        self._turn = itertools.count()
        self._sending: dict[str, list[asyncio.Future[None]]] = {room: [] for room in rooms}

    def expect(self, room: str) -> None:
        """Publish into ``room`` too."""
        self.acked.setdefault(room, [])
        self._sending.setdefault(room, [])

    async def publish(self, room: str, size: int | None = None,
                      deadline: float = PUBLISH_DEADLINE) -> Ack | None:
        """One message into ``room`` (``size`` bytes of padding), retried until
        acknowledged or ``deadline`` seconds have passed; its acknowledgement."""
        uid = f"{self.tag}-{next(self._serial)}"
        pad = "x" * (self.size if size is None else size)
        body = {"room": room, "data": {"uid": uid, "pad": pad}, "idempotency_key": uid}
        give_up = time.monotonic() + deadline
        delay = 0.05
        while True:
            url = self.urls[next(self._turn) % len(self.urls)]
            waiting, self._sending[room] = self._sending[room], []
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_result(None)
            status, answer = await self.http.call(url + "/api/publish", body)
            if status == 200:
                if not (isinstance(answer, dict) and isinstance(answer.get("epoch"), str)
                        and isinstance(answer.get("offset"), int)):
                    self.wrong.append(f"{uid}: 200 {answer!r}")
                    return None
                ack = Ack(room, answer["epoch"], answer["offset"], uid)
                self.epochs.saw(ack.epoch)
                self.acked[room].append(ack)
                self.on_ack()
                return ack
            if status not in (503, 599, 502) or time.monotonic() > give_up:
                self.unacked.append(f"{uid} in {room}: last answer {status} {answer!r}")
                return None
            self.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def next_send(self, room: str) -> None:
        """Until the publisher is about to send its next request for ``room``."""
        waiter = asyncio.get_running_loop().create_future()
        self._sending[room].append(waiter)
        await waiter

    async def steady(self, room: str, interval: float, stop: asyncio.Event,
                     size: int | None = None) -> None:
        """One message every ``interval`` seconds (each once acknowledged) until ``stop``."""
        while not stop.is_set():
            started = time.monotonic()
            await self.publish(room, size)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, interval - (time.monotonic() - started)))

    @property
    def count(self) -> int:
        return sum(len(acks) for acks in self.acked.values())


class ReadyWatch:
    """Polls every node's ``/readyz``; keeps each node's sequence of answers
    (200, 503, or ``down`` when nothing answers), repeats collapsed."""

    def __init__(self, http: Http, urls: Sequence[str], every: float = 0.05) -> None:
        self.http = http
        self.urls = list(urls)
        self.every = every
        self.seen: dict[str, list[str]] = {url: [] for url in self.urls}
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            answers = await asyncio.gather(*(self.state(url) for url in self.urls))
            for url, state in zip(self.urls, answers, strict=True):
                states = self.seen[url]
                if not states or states[-1] != state:
                    states.append(state)
                    self._changed.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every)

    async def state(self, url: str) -> str:
        status, _ = await self.http.call(url + "/readyz")
        return "down" if status == 599 else str(status)

    async def until(self, index: int, state: str, timeout: float = 60) -> None:
        """Until node ``index`` answers ``state`` (``200``, ``503``, ``down``)."""
        url = self.urls[index]
        deadline = time.monotonic() + timeout
        while not self.seen[url] or self.seen[url][-1] != state:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"n{index} never answered {state} on /readyz: {self.seen[url]}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def all_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = await asyncio.gather(*(self.state(url) for url in self.urls))
            if all(state == "200" for state in states):
                return True
            await asyncio.sleep(self.every)
        return False

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
