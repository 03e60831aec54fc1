"""A TCP relay in front of a real server, for the faults a real network has.

:class:`Relay` listens on a free loopback port and pipes every connection to
the server's port, byte for byte, in the test's own event loop. It can
:meth:`~Relay.cut` every connection at once (both sockets reset, no close
frame: a dropped network, a NAT timeout), refuse new ones for a while
(:attr:`~Relay.refusing`), and :meth:`~Relay.lose_answers`
(the request reaches the server and is served, but the answer never reaches
the client, whose connection is reset instead: what makes a client retry a
request that already took effect)::

    async with Relay(server.port) as relay:
        client = Client(relay.ws_url, ...)
        relay.cut()
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class Relay:
    """Pipes connections from :attr:`port` to ``127.0.0.1:target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        #: Connections piped so far (not counting refused ones).
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._lose = 0
        #: While True, new connections are reset as soon as they arrive (the
        #: network is still down).
        self.refusing = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self._server.wait_closed()

    def cut(self) -> int:
        """Reset every open connection, both ways; how many there were."""
        pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            client.transport.abort()
            upstream.transport.abort()
        return len(pairs)

    def lose_answers(self, connections: int = 1) -> None:
        """For the next ``connections`` accepted: what the server sends back is
        dropped and the client's connection reset when it comes."""
        self._lose += connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        self.accepted += 1
        lose = self._lose > 0
        if lose:
            self._lose -= 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.append(pair)
        for task in (self._pipe(reader, up_writer, pair, reset=False),
                     self._pipe(up_reader, writer, pair, reset=lose)):
            started = asyncio.create_task(task)
            self._tasks.add(started)
            started.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter], reset: bool) -> None:
        """Copy until either side ends, then close both (resetting the client's
        when ``reset`` and the server answered)."""
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await source.read(65536):
                    if reset:
                        pair[0].transport.abort()
                        return
                    sink.write(data)
                    await sink.drain()
        finally:
            if pair in self._pairs:
                self._pairs.remove(pair)
            for writer in pair:
                writer.close()
