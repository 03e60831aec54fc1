"""The chaos suite's careful client, stopped at its worst moments: it never leaves a
socket open, and :meth:`~tests.support.careful.CarefulClient.stop` ends it whatever
it was doing, also when the machine is slow.

A real node process (memory broker) that the test freezes with ``SIGSTOP`` is the
slow node: the kernel still accepts its connections, nothing answers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator

import pytest

from tests.support.aio import run
from tests.support.careful import CarefulClient, Progress
from tests.support.ledger import Epochs
from tests.support.servers import NO_HANDSHAKE_LIMIT, RunningServer, ServerFactory
from tests.support.tokens import SECRET, mint
from tests.support.waiting import until

pytestmark = pytest.mark.chaos

#: The most stop() may take here (seconds): less than the client's own bounds on
#: a handshake or a closing handshake (5 s and more), which stop() must not wait
#: out when the frozen node answers neither.
PROMPTLY = 4.0


@pytest.fixture
def node(run_server: ServerFactory) -> RunningServer:
    return run_server("--jwt-secret", SECRET, "--broker", "memory", *NO_HANDSHAKE_LIMIT)


@contextlib.contextmanager
def frozen(node: RunningServer) -> Iterator[Callable[[], None]]:
    """SIGSTOP ``node`` until the block ends (or the function it yields is called)."""
    os.kill(node.pid, signal.SIGSTOP)
    thawed = False

    def thaw() -> None:
        nonlocal thawed
        if not thawed:
            thawed = True
            os.kill(node.pid, signal.SIGCONT)

    try:
        yield thaw
    finally:
        thaw()


def connected_to(port: int) -> bool:
    """A TCP connection to 127.0.0.1:``port`` is established (from /proc/net/tcp)."""
    remote = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(f[2] == remote and f[3] == "01"
                   for f in (line.split() for line in list(table)[1:]))


def careful(node: RunningServer, rcvbuf: int | None = None) -> CarefulClient:
    return CarefulClient("c00", mint("careful-c00"), [node.ws_url], [], Epochs(), Progress(),
                         rcvbuf=rcvbuf)


@pytest.mark.parametrize("rcvbuf", [None, 4096], ids=["connect", "pre-connected-socket"])
def test_stopped_while_a_slow_node_has_not_answered_the_handshake(
    node: RunningServer, rcvbuf: int | None
) -> None:
    """stop() gives up the handshake at once and closes its socket: the handshake
    that completes later (the node thawed) is never served, and a second stop()
    returns normally. (It used to wait 5 s, cancel the client while it served
    that late connection, leave its socket open, and raise CancelledError on
    the second stop.)"""

    async def scenario() -> None:
        client = careful(node, rcvbuf)
        with frozen(node) as thaw:
            client.start()
            # The kernel accepts for the frozen node: the client is in its handshake.
            await until(lambda: connected_to(node.port))
            stopping = asyncio.ensure_future(client.stop())
            await asyncio.sleep(0)
            thaw()  # the node answers the handshake now, after stop()
            await asyncio.wait_for(stopping, PROMPTLY)
        assert not client.running()
        assert client.connections == 0, client.closes
        await client.stop()

    run(scenario, 30)


def test_a_stop_cancelled_while_closing_cuts_the_connection(node: RunningServer) -> None:
    """A stop() cancelled while the frozen node keeps it waiting for the closing
    handshake propagates the cancellation and takes the client's loop and its
    connection with it; stop() again returns normally."""

    async def scenario() -> None:
        client = careful(node)
        client.start()
        assert await client.progress.until(client.connected, 20), client.closes
        with frozen(node):
            stopping = asyncio.ensure_future(client.stop())
            await asyncio.sleep(0)  # stop() sends its close frame; nothing answers
            assert not stopping.done()
            stopping.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stopping
            assert not client.running()
            assert not client.connected()
            await asyncio.wait_for(client.stop(), PROMPTLY)

    run(scenario, 30)
