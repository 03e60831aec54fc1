"""Tasks that misbehave on purpose, for the task pool's tests.

Each is a module-level function so worker processes can import it. ``announce``
tells the test, over a Unix socket, which worker process runs it: the test then
knows which pid to kill without guessing.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from wsserver.tasks import Int, Str, TaskTable

tasks = TaskTable()


@tasks.task("spin", ms=Int(0, 600_000))
def spin(ms: int) -> int:
    """Keep a CPU busy for ``ms`` milliseconds (a runaway task when ``ms`` is large)."""
    deadline = time.monotonic() + ms / 1000
    while time.monotonic() < deadline:
        pass
    return ms


@tasks.task("announce", path=Str(), ms=Int(0, 600_000))
def announce(path: str, ms: int) -> int:
    """Send this worker's pid to the Unix socket ``path``, spin ``ms`` ms, return the pid."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        conn.sendall(f"{os.getpid()}\n".encode())
    spin(ms)
    return os.getpid()


@tasks.task("exit", code=Int(0, 255))
def exit_now(code: int) -> None:
    """End the worker process at once, as a crashing extension would."""
    os._exit(code)


@tasks.task("raise")
def raise_error() -> None:
    """Raise an ordinary exception inside the worker."""
    raise RuntimeError("raised on purpose")


@tasks.task("allocate")
def allocate_too_much() -> int:
    """Ask for 4 EiB: a real MemoryError in the worker."""
    return len(bytearray(1 << 62))


@tasks.task("niceness")
def niceness() -> int:
    """The worker's nice value."""
    return os.nice(0)


@tasks.task("pid")
def pid() -> int:
    """The worker's process id."""
    return os.getpid()


# --- the receiving end of ``announce`` (used by the tests, not the workers) ----------


class Announcements:
    """A Unix socket the ``announce`` task reports its worker's pid to."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pids: asyncio.Queue[int] = asyncio.Queue()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        await self.pids.put(int(line))


@asynccontextmanager
async def announcements() -> AsyncIterator[Announcements]:
    """A listening :class:`Announcements` in a temporary directory."""
    with tempfile.TemporaryDirectory() as directory:
        box = Announcements(str(Path(directory) / "announce.sock"))
        server = await asyncio.start_unix_server(box._accept, box.path)
        try:
            yield box
        finally:
            server.close()
            await server.wait_closed()


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait (on a pidfd, not by polling) until process ``pid`` has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)
