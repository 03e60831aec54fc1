"""A client for the server API (``/api/...``), for the application's backend.

::

    async with ApiClient("http://127.0.0.1:9000", key) as api:
        await api.publish("user:alice", {"text": "your report is ready"})

Retries with exponential backoff and full jitter when the answer is 503 (the
broker cannot be reached; its ``Retry-After`` is a floor) or when no answer
comes (connection refused or reset, timeout: a node restarting). A publish
carries an idempotency key, made once per call and sent again with every retry,
so a publish whose answer was lost is not published twice (the server keeps
keys 5 minutes). Errors are :class:`~wsserver.client.errors.ApiError` subclasses.

Over aiohttp, with connections kept alive between calls (the server's own
outbound HTTP client makes the same choice: ``wsserver/edge/httpclient.py``
says why not Tornado's); the retry decision is
:func:`wsserver.client.decisions.api_retryable`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random as _random
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import aiohttp

from wsserver.client.decisions import api_retryable, backoff_delay
from wsserver.client.errors import ApiError, ApiUnavailable, api_error
from wsserver.client.messages import History, Json, Message, Presence

log = logging.getLogger("wsserver.client.api")


class ApiClient:
    """The server API with its key, retries and idempotency keys built in.

    Args:
        base_url: ``http(s)://host:port`` of the listener serving ``/api/``
            (the ``--internal-port`` one when it is set).
        key: the API key (``--api-key-file``); sent as ``Authorization: apikey``.
        timeout: seconds for one attempt (connecting included).
        retries: attempts after the first, for 503 and unanswered requests.
        random: the jitter source (tests pin it).
    """

    def __init__(self, base_url: str, key: str, *, timeout: float = 10.0, retries: int = 4,
                 random: Callable[[], float] = _random.random) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http:// or https:// URL")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self._key = key
        self._random = random
        self._http: aiohttp.ClientSession | None = None
        #: Attempts made by the last call (1 when the first one was answered).
        self.attempts = 0

    def __repr__(self) -> str:
        return f"ApiClient({self.base_url!r})"  # never the key

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pooled connections."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- the endpoints (docs/api.md) ---------------------------------------------------

    async def publish(self, room: str, data: Any, *, idempotency_key: str | None = None) -> Json:
        """Publish ``data`` to ``room`` on every node: ``{}``, or ``{"offset", "epoch"}``
        in a room with history. The same ``idempotency_key`` (one is made when not
        given) goes with every retry, so the message is published once."""
        body = {"room": room, "data": data,
                "idempotency_key": idempotency_key or uuid.uuid4().hex}
        answer: Json = await self._call("POST", "/api/publish", body)
        return answer

    async def broadcast(self, rooms: Sequence[str], data: Any, *,
                        idempotency_key: str | None = None) -> list[Json]:
        """Publish ``data`` to each of ``rooms``; one result per room, in order
        (``{"error": "unavailable"}`` for a room whose publish failed)."""
        body = {"rooms": list(rooms), "data": data,
                "idempotency_key": idempotency_key or uuid.uuid4().hex}
        answer = await self._call("POST", "/api/broadcast", body)
        results = answer.get("results")
        return [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []

    async def disconnect(self, user: str, *, code: int | None = None,
                         reason: str | None = None) -> None:
        """Close every connection of ``user`` on every node (default code 4003:
        clients stop and do not reconnect)."""
        body: Json = {"user": user}
        if code is not None:
            body["code"] = code
        if reason is not None:
            body["reason"] = reason
        await self._call("POST", "/api/disconnect", body)

    async def rooms(self) -> dict[str, Json]:
        """Rooms with members, on every node: room → ``{"connections", "users"}``."""
        answer = await self._call("GET", "/api/rooms")
        rooms = answer.get("rooms")
        return rooms if isinstance(rooms, dict) else {}

    async def presence(self, room: str) -> Presence:
        """Who is in ``room`` (namespaces with ``presence = true``)."""
        answer = await self._call("GET", "/api/presence", query={"room": room})
        users = answer.get("users")
        connections = answer.get("connections")
        return Presence(room, [u for u in users if isinstance(u, str)]
                        if isinstance(users, list) else [],
                        connections if isinstance(connections, int) else 0)

    async def history(self, room: str, *, since: int | None = None, epoch: str | None = None,
                      limit: int | None = None) -> History:
        """The kept messages of ``room`` after offset ``since``.

        Raises:
            EpochChanged: ``epoch`` is not the room's any more (its history was lost).
            ApiBadRequest: the room keeps no history.
        """
        query: dict[str, str] = {"room": room}
        if since is not None:
            query["since"] = str(since)
        if epoch is not None:
            query["epoch"] = epoch
        if limit is not None:
            query["limit"] = str(limit)
        answer = await self._call("GET", "/api/history", query=query)
        messages = answer.get("messages")
        return History(
            epoch=str(answer.get("epoch")),
            offset=int(answer.get("offset") or 0),
            complete=bool(answer.get("complete", True)),
            messages=[Message.from_json(m) for m in messages if isinstance(m, dict)]
            if isinstance(messages, list) else [],
        )

    async def nodes(self) -> list[Json]:
        """The nodes sharing the broker: ``{"name", "connections", "users", "uptime"}`` each."""
        answer = await self._call("GET", "/api/nodes")
        nodes = answer.get("nodes")
        return [n for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []

    # --- one call, retried ---------------------------------------------------------------

    async def _call(self, method: str, path: str, body: Json | None = None,
                    query: dict[str, str] | None = None) -> Json:
        url = self.base_url + path + (f"?{urlencode(query)}" if query else "")
        payload = None if body is None else json.dumps(body).encode()
        self.attempts = 0
        while True:
            self.attempts += 1
            status, answer, retry_after = await self._attempt(method, url, payload)
            if status == 200 and isinstance(answer, dict):
                return answer
            error = (api_error(status, answer, retry_after) if status is not None
                     else ApiUnavailable(599, "no_answer", str(answer)))
            if not api_retryable(status) or self.attempts > self.retries:
                raise error
            delay = max(backoff_delay(self.attempts - 1, self._random), retry_after or 0.0)
            log.info("wsserver api: %s %s: %s; retry %d in %.2f s", method, path, error,
                     self.attempts, delay)
            await asyncio.sleep(delay)

    async def _attempt(self, method: str, url: str,
                       payload: bytes | None) -> tuple[int | None, Any, float | None]:
        """(status or None when no answer, decoded body or the failure, Retry-After)."""
        if self._http is None:
            # Made on first use, inside the running loop.
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        headers = {"Authorization": f"apikey {self._key}"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._http.request(method, url, data=payload, headers=headers,
                                          allow_redirects=False) as response:
                body = await response.read()
                status, retry = response.status, response.headers.get("Retry-After")
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            return None, error, None  # refused, reset, timed out: no answer
        try:
            answer = json.loads(body or b"null")
        except ValueError:
            answer = None
        try:
            retry_after = float(retry) if retry is not None else None
        except ValueError:
            retry_after = None
        return status, answer, retry_after


__all__ = ["ApiClient", "ApiError"]
