"""An HTTP-streaming client: ``GET /sse`` read by httpx, ``POST /sse/send`` to talk.

:func:`stream` opens a stream (with a bearer token, or a ticket from
:func:`ticket`) and answers a :class:`StreamClient` whatever the status, for
tests of refusals; :func:`streamed` expects the 200 and the ``welcome``.
A *target* is a port on 127.0.0.1, an ``http://`` base URL, or anything with
a ``url`` (``RunningServer``, ``Nginx``).

A :class:`StreamClient` has the methods of :class:`tests.support.clients.AsyncClient`
(``send``, ``recv``, ``ask``, ``next``, ``join``, ``messages_until``,
``until_closed``), so a scenario reads the same over both transports. The
stream's ``close`` event ends it: ``recv`` answers None after it, and
``close_code``/``close_reason`` hold what it said. Keepalive comments are
kept in ``comments``. Every client is closed when the test's loop ends
(:func:`tests.support.clients.track_async`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any, Protocol

import httpx

from tests.support.clients import WAIT, Conversation, Message, Outgoing, track_async
from tests.support.tokens import mint


class HasUrl(Protocol):
    @property
    def url(self) -> str: ...


StreamTarget = int | str | HasUrl


def base_of(target: StreamTarget) -> str:
    """The ``http://host:port`` of ``target``."""
    if isinstance(target, int):
        return f"http://127.0.0.1:{target}"
    if isinstance(target, str):
        return target.rstrip("/")
    return target.url.rstrip("/")


_END = object()


class StreamClient(Conversation):
    """One ``GET /sse`` response, read event by event in the background."""

    def __init__(self, base: str, http: httpx.AsyncClient, response: httpx.Response) -> None:
        self.base = base
        self.http = http
        self.response = response
        self.status = response.status_code
        self.headers = response.headers
        self.welcome: Message | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        #: Every comment line received (keepalives), with its arrival time.
        self.comments: list[tuple[float, str]] = []
        #: Every event's arrival time, in order (for tests of when events arrive).
        self.arrivals: list[float] = []
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._ended = False
        self.body = b""
        self._reader: asyncio.Task[None] | None = None
        if self.status == 200:
            self._reader = asyncio.ensure_future(self._read())

    @property
    def session(self) -> str:
        assert self.welcome is not None, "not welcomed"
        session: str = self.welcome["session"]
        return session

    def json(self) -> Any:
        """A refused stream's JSON body."""
        return json.loads(self.body)

    async def _read(self) -> None:
        data: list[str] = []
        buffer = ""
        try:
            async for text in self.response.aiter_text():
                buffer += text
                while "\n" in buffer:
                    line, buffer = buffer.split("\n", 1)
                    line = line.removesuffix("\r")
                    if line == "":
                        if data:
                            self.arrivals.append(time.monotonic())
                            self._events.put_nowait(json.loads("\n".join(data)))
                            data = []
                    elif line.startswith(":"):
                        self.comments.append((time.monotonic(), line[1:].strip()))
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    # Other fields (event:, id:, retry:) are not used by the server.
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self._events.put_nowait(_END)

    async def recv(self, timeout: float = WAIT) -> Message | None:
        """The next event's message; None once the stream ended (after its close event)."""
        if self._ended:
            return None
        try:
            item = await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"nothing received within {timeout} s") from None
        if item is _END:
            self._ended = True
            return None
        message: Message = item
        if message.get("type") == "close":
            self.close_code, self.close_reason = message["code"], message["reason"]
            # The close event is the stream's last: its end follows.
            end = await asyncio.wait_for(self._events.get(), timeout)
            assert end is _END, f"an event after the close event: {end}"
            self._ended = True
            return None
        return message

    async def post(self, body: bytes | str, *, session: str | None = None,
                   headers: Mapping[str, str] | None = None) -> httpx.Response:
        """``POST /sse/send`` of ``body`` as it is, with this stream's ``X-Session``."""
        all_headers = {"Content-Type": "application/json",
                       "X-Session": session if session is not None else self.session}
        all_headers.update(headers or {})
        return await self.http.post(f"{self.base}/sse/send", content=body, headers=all_headers)

    async def send(self, message: Outgoing) -> None:
        """Send one client message; the server must answer 202."""
        body = message if isinstance(message, str | bytes) else json.dumps(message)
        answer = await self.post(body)
        assert answer.status_code == 202, (answer.status_code, answer.text)

    async def aclose(self) -> None:
        """Cut the stream (the client goes) and free everything."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.response.aclose()
        await self.http.aclose()


def _client() -> httpx.AsyncClient:
    # No pool sharing between streams: each stream is its own client and
    # connection, as each EventSource is; no timeout on reading a quiet stream.
    return httpx.AsyncClient(timeout=httpx.Timeout(WAIT, read=None))


async def stream(
    target: StreamTarget,
    tok: str | None = None,
    *,
    ticket: str | None = None,
    headers: Mapping[str, str] | None = None,
    origin: str | None = None,
    query: str = "",
) -> StreamClient:
    """``GET /sse`` with ``tok`` as a bearer header (or ``ticket`` in the query);
    the client whatever the answer (a refusal's body is read)."""
    base = base_of(target)
    all_headers = dict(headers or {})
    if tok is not None:
        all_headers["Authorization"] = f"Bearer {tok}"
    if origin is not None:
        all_headers["Origin"] = origin
    url = f"{base}/sse" + (f"?ticket={ticket}" if ticket is not None else query)
    http = _client()
    try:
        response = await http.send(http.build_request("GET", url, headers=all_headers),
                                   stream=True)
    except BaseException:
        await http.aclose()
        raise
    client = StreamClient(base, http, response)
    track_async(client)
    if client.status != 200:
        client.body = await response.aread()
    return client


async def streamed(target: StreamTarget, tok: str | None = None, **kw: Any) -> StreamClient:
    """A stream past its ``welcome`` (kept in ``.welcome``)."""
    if tok is None and "ticket" not in kw:
        tok = mint()
    client = await stream(target, tok, **kw)
    assert client.status == 200, (client.status, client.body)
    first = await client.recv()
    assert first is not None, f"ended before the welcome: {client.close_code} {client.close_reason}"
    assert first["type"] == "welcome", first
    client.welcome = first
    return client


async def ticket(target: StreamTarget, tok: str | None, *,
                 headers: Mapping[str, str] | None = None) -> httpx.Response:
    """``POST /auth/ticket`` with ``tok`` as the bearer token; the answer."""
    all_headers = dict(headers or {})
    if tok is not None:
        all_headers["Authorization"] = f"Bearer {tok}"
    async with httpx.AsyncClient(timeout=WAIT) as http:
        return await http.post(f"{base_of(target)}/auth/ticket", headers=all_headers)


async def post_send(target: StreamTarget, session: str, body: bytes | str, *,
                    headers: Mapping[str, str] | None = None) -> httpx.Response:
    """``POST /sse/send`` from a client of its own (not a stream's)."""
    all_headers = {"Content-Type": "application/json", "X-Session": session}
    all_headers.update(headers or {})
    async with httpx.AsyncClient(timeout=WAIT) as http:
        return await http.post(f"{base_of(target)}/sse/send", content=body, headers=all_headers)
