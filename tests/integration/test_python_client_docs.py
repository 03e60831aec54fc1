"""The program in docs/python-client.md, as written there, through node kills and restarts.

Issue 25's "done when": a short Python program follows a room through node
restarts without losing a message or being silent about one. The program is
taken from the page (only its two node addresses are replaced by the test's
ports) and run as its own process; messages are published through the server
API; its output is checked line by line.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.support.aio import run
from tests.support.cluster import KEY, node_args, write_files
from tests.support.redis_server import RedisServer
from tests.support.servers import NO_HANDSHAKE_LIMIT, ROOT, RunningServer, free_port
from wsserver.client import ClientError
from wsserver.client.api import ApiClient

pytestmark = pytest.mark.slow

ROOM = "chat:lobby"
DOC_NODES = ("127.0.0.1:8888", "127.0.0.1:8889")
WAIT = 30.0
StartServer = Callable[..., RunningServer]


def docs_program() -> str:
    """The page's complete program: its one ``python`` block that runs ``asyncio.run``."""
    text = (ROOT / "docs" / "python-client.md").read_text()
    [program] = [block for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
                 if "asyncio.run(" in block]
    assert all(node in program for node in DOC_NODES)
    return program


@pytest.fixture
def start(run_server: StartServer, tmp_path: Path) -> StartServer:
    """``start(broker, name, *extra)``: a node with demo tokens, history in ``chat:*``."""
    config, key = write_files(tmp_path / "files")

    def start_node(broker: str, name: str, *extra: str) -> RunningServer:
        node = run_server(*node_args(broker, name, config, key, "--demo", *NO_HANDSHAKE_LIMIT,
                                     *extra))
        if broker != "memory":
            node.wait_for_log(r"broker: Redis at \S+ is up")
        return node

    return start_node


class Follower:
    """The docs' program running as a process; its output, line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def read(self, count: int) -> list[str]:
        """The next ``count`` lines it prints."""
        assert self.proc.stdout is not None
        got = []
        async with asyncio.timeout(WAIT):
            while len(got) < count:
                line = await self.proc.stdout.readline()
                assert line, f"the program ended: {self.lines + got}"
                got.append(line.decode().rstrip("\n"))
        self.lines += got
        return got


@asynccontextmanager
async def follower(script: Path, ports: tuple[int, int]) -> AsyncIterator[Follower]:
    program = docs_program()
    for doc_node, port in zip(DOC_NODES, ports, strict=True):
        program = program.replace(doc_node, f"127.0.0.1:{port}")
    script.write_text(program)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-u", str(script), cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        yield Follower(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def following(api: ApiClient) -> bool:
    """The program is in the room (on whichever node)."""
    try:
        return "follower" in (await api.presence(ROOM)).users
    except ClientError:  # the node is not up yet
        return False


async def joined(api: ApiClient) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not await following(api):
        assert asyncio.get_running_loop().time() < deadline, "the program never joined"
        await asyncio.sleep(0.05)


def test_the_docs_program_misses_nothing_through_node_kills_and_restarts(
    start: StartServer, redis: RedisServer, tmp_path: Path
) -> None:
    a, b = start(redis.url, "a"), start(redis.url, "b")
    port_a = a.port

    async def scenario() -> None:
        async with follower(tmp_path / "follow.py", (a.port, b.port)) as program, \
                ApiClient(b.url, KEY) as via_b:
            await joined(via_b)
            for n in range(1, 6):
                await via_b.publish(ROOM, n)
            await program.read(5)
            a.proc.kill()  # the program's node: it moves to b
            a.proc.wait()
            for n in range(6, 11):
                await via_b.publish(ROOM, n)
            await program.read(5)
            a2 = start(redis.url, "a", "--port", str(port_a))
            b.proc.kill()  # now b dies: back to a, restarted
            b.proc.wait()
            async with ApiClient(a2.url, KEY) as via_a:
                for n in range(11, 16):
                    await via_a.publish(ROOM, n)
                await program.read(5)
            assert program.lines == [f"{n} {n}" for n in range(1, 16)]

    run(scenario, timeout=120)


def test_the_docs_program_says_so_when_a_restart_lost_the_history(
    start: StartServer, tmp_path: Path
) -> None:
    """Memory broker, one node (the other address has no server): the
    restarted node has a new epoch, so the program prints a GAP line where
    the loss is, then goes on."""
    node = start("memory", "a")
    port = node.port

    async def scenario() -> None:
        async with follower(tmp_path / "follow.py", (port, free_port())) as program:
            async with ApiClient(node.url, KEY) as api:
                await joined(api)
                for n in range(1, 4):
                    await api.publish(ROOM, n)
                await program.read(3)
            node.stop()
            restarted = start("memory", "a", "--port", str(port))
            async with ApiClient(restarted.url, KEY) as api:
                await joined(api)
                await api.publish(ROOM, 4)
                await program.read(2)
            assert program.lines == [
                "1 1", "2 2", "3 3",
                "GAP (recovery_failed) up to offset 0: reload chat:lobby",
                "1 4",
            ]

    run(scenario, timeout=120)
