"""The ``task`` message through real sockets against a real ``python -m wsserver``.

Every answer docs/protocol.md gives to ``task`` is produced here: ``result`` (checked
against an independent computation), ``bad_request``, ``unknown_task``,
``busy``, ``timeout`` and ``task_failed``; plus the loop staying responsive
while the pool is saturated, and no worker process outliving the server.

Misbehaving tasks come from tests/support/tasks.py (``--tasks-module``):
``spin`` is a runaway, ``announce`` reports its worker's pid over a Unix socket
so a test kills exactly the process running a given task.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.aio import run
from tests.support.clients import AsyncClient, welcomed
from tests.support.metrics import value
from tests.support.tasks import announcements, wait_gone

SERVER_OPTIONS = ("--message-rate", "100000", "--message-burst", "100000")


# --- helpers -------------------------------------------------------------------------


class Client:
    """A client that matches replies to requests by ``id`` (many in flight at once)."""

    def __init__(self, ws: AsyncClient) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        # The library's own iteration: it waits as long as the tasks take.
        async for raw in self.ws.raw:
            message = json.loads(raw)
            future = self._waiting.pop(message.get("id"), None)
            if future is not None and not future.done():
                future.set_result(message)

    async def send(self, message: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send ``message`` with a fresh id; the future of its reply."""
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        await self.ws.send({**message, "id": request_id})
        return future

    async def ask(self, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send ``message`` and wait for its reply."""
        return await asyncio.wait_for(await self.send(message), timeout)

    async def task(self, name: str, args: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send a task; the future of its reply."""
        return await self.send({"type": "task", "name": name, "args": args})

    def stop_reading(self) -> None:
        self._reader.cancel()


@asynccontextmanager
async def client(srv: Any, user: str = "u1") -> AsyncIterator[Client]:
    ws = await welcomed(srv, srv.demo_token(user), ping_interval=None)
    c = Client(ws)
    try:
        yield c
    finally:
        c.stop_reading()
        await ws.close()




def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (workers are children of the forkserver child)."""
    found: set[int] = set()
    stack = [pid]
    while stack:
        parent = stack.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = {int(kid) for kid in children.read_text().split()}
            except (FileNotFoundError, ProcessLookupError):
                continue
            stack.extend(kids - found)
            found |= kids
    return found



def iterated_sha256_by_hashlib(data: str, rounds: int) -> str:
    digest = data.encode("utf-8")
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


def primes_below_by_trial_division(limit: int) -> int:
    return sum(all(n % d for d in range(2, int(n**0.5) + 1)) for n in range(2, limit))




Start = Callable[..., Any]


# --- result --------------------------------------------------------------------------


def test_builtin_results_match_an_independent_computation(run_server: Start) -> None:
    srv = run_server(*SERVER_OPTIONS, "--task-workers", "2", "--task-per-connection", "8")

    async def main() -> None:
        async with client(srv) as c:
            cases = [
                ("primes", {"limit": n}, primes_below_by_trial_division(n))
                for n in (0, 1, 2, 3, 100, 7919, 7920, 20_000)
            ] + [
                ("primes", {"limit": 50_000_000}, 3_001_134),  # the upper bound; published count
                ("sha256", {"data": "abc", "rounds": 1},
                 "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
                ("sha256", {"data": "", "rounds": 3}, iterated_sha256_by_hashlib("", 3)),
                ("sha256", {"data": "héllo ✓ 🚀", "rounds": 100_000},
                 iterated_sha256_by_hashlib("héllo ✓ 🚀", 100_000)),
            ]
            for name, args, expected in cases:
                reply = await c.ask({"type": "task", "name": name, "args": args})
                assert reply == {"type": "result", "name": name, "value": expected,
                                 "id": reply["id"]}, (name, args)

    run(main)
    assert value(srv, "wsserver_tasks_total", name="primes", outcome="ok") == 9


def test_tasks_of_a_tasks_module_are_served(run_server: Start) -> None:
    srv = run_server(*SERVER_OPTIONS, "--task-workers", "1", "--tasks-module",
                     "tests.example_tasks")

    async def main() -> None:
        async with client(srv) as c:
            reply = await c.ask({"type": "task", "name": "fibonacci", "args": {"n": 78}})
            assert reply["value"] == 8_944_394_323_791_464
            reply = await c.ask({"type": "task", "name": "word_count",
                                 "args": {"text": "a b a"}})
            assert reply["value"] == {"a": 2, "b": 1}
            reply = await c.ask({"type": "task", "name": "fibonacci", "args": {"n": 79}})
            assert reply["code"] == "bad_request"

    run(main)


# --- bad_request and unknown_task ----------------------------------------------------

BAD: list[tuple[str, Any, str]] = [
    ("primes", {}, "args.limit is missing"),
    ("primes", {"limit": True}, "must be an integer, not a boolean"),
    ("primes", {"limit": 10.0}, "must be an integer, not a number"),
    ("primes", {"limit": "10"}, "must be an integer, not a string"),
    ("primes", {"limit": None}, "must be an integer, not null"),
    ("primes", {"limit": -1}, "must be between 0 and 50000000"),
    ("primes", {"limit": 50_000_001}, "must be between 0 and 50000000"),
    ("primes", {"limit": 10, "extra": 1}, "unexpected argument(s) extra"),
    ("primes", [10], "must be an object"),  # refused by the protocol or the table
    ("sha256", {"data": "x"}, "args.rounds is missing"),
    ("sha256", {"rounds": 1}, "args.data is missing"),
    ("sha256", {"data": "x", "rounds": 0}, "must be between 1 and 10000000"),
    ("sha256", {"data": "x", "rounds": 10_000_001}, "must be between 1 and 10000000"),
    ("sha256", {"data": "x", "rounds": False}, "must be an integer, not a boolean"),
    ("sha256", {"data": 42, "rounds": 1}, "args.data must be a string, not a number"),
    ("sha256", {"data": "\ud800", "rounds": 1}, "must be valid Unicode"),
]


def test_each_kind_of_bad_argument_is_bad_request_and_unknown_names_unknown_task(
    run_server: Start,
) -> None:
    # One worker, queue of one, busy with a long task: a bad request that got
    # as far as the pool would be answered busy, not bad_request.
    srv = run_server(*SERVER_OPTIONS, "--task-workers", "1", "--task-queue", "1",
                     "--task-per-connection", "2", "--tasks-module", "tests.support.tasks")

    async def main() -> None:
        async with client(srv, "hog") as hog, client(srv) as c:
            await hog.task("spin", {"ms": 600_000})
            for name, args, words in BAD:
                reply = await c.ask({"type": "task", "name": name, "args": args})
                assert reply["type"] == "error", (name, args, reply)
                assert reply["code"] == "bad_request", (name, args, reply)
                assert words in reply["message"], (name, args, reply)
            for name in ("nope", "PRIMES", ""):
                reply = await c.ask({"type": "task", "name": name, "args": {}})
                assert reply["code"] == "unknown_task", reply
            # The connection is still open and served.
            assert (await c.ask({"type": "ping"}))["type"] == "pong"

    run(main)


# --- busy ------------------------------------------------------------------------------


def test_past_the_queue_bound_busy_is_answered_within_a_second(run_server: Start) -> None:
    srv = run_server(*SERVER_OPTIONS, "--task-workers", "1", "--task-queue", "2",
                     "--task-per-connection", "4", "--tasks-module", "tests.support.tasks")

    async def main() -> None:
        async with client(srv) as c:
            for _ in range(2):  # one running, one waiting: the queue is full
                await c.task("spin", {"ms": 600_000})
            started = time.monotonic()
            reply = await c.ask({"type": "task", "name": "primes", "args": {"limit": 10}})
            elapsed = time.monotonic() - started
            assert reply["code"] == "busy", reply
            assert elapsed < 1.0
            assert value(srv, "wsserver_task_queue_depth") == 2

    run(main)
    assert value(srv, "wsserver_tasks_total", name="primes", outcome="busy") == 1


def test_one_connection_cannot_take_the_whole_pool(run_server: Start) -> None:
    srv = run_server(*SERVER_OPTIONS, "--task-workers", "3", "--task-queue", "8",
                     "--task-per-connection", "2", "--tasks-module", "tests.support.tasks")

    async def main() -> None:
        async with client(srv, "greedy") as greedy, client(srv, "other") as other:
            await greedy.task("spin", {"ms": 600_000})
            await greedy.task("spin", {"ms": 600_000})
            reply = await greedy.ask({"type": "task", "name": "primes", "args": {"limit": 10}})
            assert reply["code"] == "busy"
            # The third worker is still there for another connection.
            reply = await other.ask({"type": "task", "name": "primes", "args": {"limit": 10}})
            assert reply["value"] == 4

    run(main)


def test_one_user_cannot_take_the_whole_pool_across_connections(run_server: Start) -> None:
    srv = run_server(*SERVER_OPTIONS, "--task-workers", "3", "--task-queue", "8",
                     "--task-per-connection", "2", "--task-per-user", "2",
                     "--tasks-module", "tests.support.tasks")

    async def main() -> None:
        async with client(srv, "greedy") as a, client(srv, "greedy") as b, \
                client(srv, "other") as other:
            await a.task("spin", {"ms": 600_000})
            await b.task("spin", {"ms": 600_000})
            reply = await b.ask({"type": "task", "name": "primes", "args": {"limit": 10}})
            assert reply["code"] == "busy" and "per user" in reply["message"], reply
            reply = await other.ask({"type": "task", "name": "primes", "args": {"limit": 10}})
            assert reply["value"] == 4

    run(main)


def test_closing_a_connection_stops_its_tasks_and_frees_the_worker(run_server: Start) -> None:
    srv = run_server(*SERVER_OPTIONS, "--task-workers", "1", "--task-queue", "4",
                     "--task-timeout", "600", "--tasks-module", "tests.support.tasks")

    async def main() -> None:
        async with announcements() as box:
            async with client(srv, "leaver") as c:
                await c.task("announce", {"path": box.path, "ms": 600_000})
                runaway = await asyncio.wait_for(box.pids.get(), 10)
                await c.task("spin", {"ms": 600_000})  # waits behind it
                for _ in range(500):  # until the server has queued it
                    if value(srv, "wsserver_task_queue_depth") == 2:
                        break
                    await asyncio.sleep(0.01)
                assert value(srv, "wsserver_task_queue_depth") == 2
            # Its connection is gone: the worker running its task is stopped ...
            assert await asyncio.to_thread(wait_gone, runaway), "the abandoned task still runs"
            async with client(srv, "next") as c:
                # ... and the queued one dropped: the replacement serves at once.
                started = time.monotonic()
                reply = await c.ask({"type": "task", "name": "primes", "args": {"limit": 10}})
                assert reply["value"] == 4
                assert time.monotonic() - started < 5

    run(main)
    assert value(srv, "wsserver_tasks_total", name="announce", outcome="cancelled") == 1
    assert value(srv, "wsserver_tasks_total", name="spin", outcome="cancelled") == 1
    assert value(srv, "wsserver_task_queue_depth") == 0


# --- timeout -------------------------------------------------------------------------


def test_a_runaway_task_times_out_and_the_next_task_is_served(run_server: Start) -> None:
    # 2 s, not less: the next task waits for the replacement worker to start, and on a
    # loaded machine (two shared cores) a Python process can take over 0.5 s to start.
    srv = run_server(*SERVER_OPTIONS, "--task-workers", "1", "--task-timeout", "2",
                     "--tasks-module", "tests.support.tasks")

    async def main() -> None:
        async with announcements() as box, client(srv) as c:
            runaway = await c.task("announce", {"path": box.path, "ms": 600_000})
            runaway_pid = await asyncio.wait_for(box.pids.get(), 10)
            reply = await asyncio.wait_for(runaway, 10)
            assert reply["code"] == "timeout", reply
            assert reply["id"] is not None
            # The worker that ran it is gone, not left spinning...
            assert wait_gone(runaway_pid), "the runaway task's worker still runs"
            # ...and its replacement serves the next task, well inside the timeout.
            started = time.monotonic()
            reply = await c.ask({"type": "task", "name": "sha256",
                                 "args": {"data": "x", "rounds": 1000}}, timeout=5)
            assert reply["value"] == iterated_sha256_by_hashlib("x", 1000)
            assert time.monotonic() - started < 2

    run(main)
    assert value(srv, "wsserver_tasks_total", name="announce", outcome="timeout") == 1


# --- task_failed -----------------------------------------------------------------------


def test_a_worker_killed_mid_task_costs_that_task_only(run_server: Start) -> None:
    srv = run_server(*SERVER_OPTIONS, "--task-workers", "2", "--task-queue", "6",
                     "--task-per-connection", "6", "--tasks-module", "tests.support.tasks")

    async def main() -> None:
        async with announcements() as box, client(srv) as c:
            victim = await c.task("announce", {"path": box.path, "ms": 600_000})
            victim_pid = await asyncio.wait_for(box.pids.get(), 10)
            neighbour = await c.task("announce", {"path": box.path, "ms": 500})
            neighbour_pid = await asyncio.wait_for(box.pids.get(), 10)
            queued = await c.task("sha256", {"data": "q", "rounds": 20_000})
            assert {victim_pid, neighbour_pid} <= descendants(srv.pid)

            os.kill(victim_pid, signal.SIGKILL)

            assert (await asyncio.wait_for(victim, 10))["code"] == "task_failed"
            assert (await asyncio.wait_for(neighbour, 10))["value"] == neighbour_pid
            assert (await asyncio.wait_for(queued, 10))["value"] == iterated_sha256_by_hashlib(
                "q", 20_000
            )
            # The pool goes on serving, on two workers again.
            for _ in range(4):
                reply = await c.ask({"type": "task", "name": "primes", "args": {"limit": 100}})
                assert reply["value"] == 25

    run(main)
    assert value(srv, "wsserver_tasks_total", name="announce", outcome="task_failed") == 1
    assert "Traceback" not in srv.logs()
    assert "a worker process died running task 'announce'" in srv.logs()


def test_a_result_for_a_closed_connection_is_dropped_quietly(run_server: Start) -> None:
    srv = run_server(*SERVER_OPTIONS, "--task-workers", "1",
                     "--tasks-module", "tests.support.tasks")

    async def main() -> None:
        async with client(srv) as c:
            await c.task("spin", {"ms": 300})
        async with client(srv) as c:
            # Queued behind the abandoned task: answered once that one is dropped.
            reply = await c.ask({"type": "task", "name": "primes", "args": {"limit": 10}})
            assert reply["value"] == 4

    run(main)
    assert "Traceback" not in srv.logs()


# --- the loop stays responsive -----------------------------------------------------------


def test_pings_are_answered_fast_while_the_pool_is_saturated(run_server: Start) -> None:
    workers = os.cpu_count() or 2
    srv = run_server(*SERVER_OPTIONS, "--task-workers", str(workers), "--task-queue",
                     str(2 * workers), "--task-per-connection", str(2 * workers))

    async def main() -> None:
        async with client(srv, "worker") as busy, client(srv, "pinger") as pinger:
            # 2x as many as workers, each about 2 s of pure CPU on every core.
            pending = [await busy.task("sha256", {"data": str(i), "rounds": 10_000_000})
                       for i in range(2 * workers)]
            await busy.ask({"type": "ping"})  # every task message has been handled
            latencies = []
            for _ in range(300):
                started = time.perf_counter()
                await pinger.ask({"type": "ping"})
                latencies.append(time.perf_counter() - started)
            latencies.sort()
            p99 = latencies[int(len(latencies) * 0.99) - 1]
            still_running = sum(not future.done() for future in pending)
            assert still_running == 2 * workers, "the pool was not saturated while measuring"
            print(f"ping p50 {latencies[len(latencies) // 2] * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
            assert p99 < 0.050, f"p99 ping {p99 * 1000:.1f} ms while the pool is saturated"

    run(main)


# --- shutdown --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "exit_code"),
    [(signal.SIGTERM, 0), (signal.SIGKILL, -signal.SIGKILL)],
    ids=["sigterm", "sigkill"],
)
def test_no_worker_process_outlives_the_server(run_server: Start, sig: int, exit_code: int) -> None:
    """SIGTERM: the server stops its pool. SIGKILL: the workers notice and exit."""
    srv = run_server(*SERVER_OPTIONS, "--task-workers", "2",
                     "--tasks-module", "tests.support.tasks")

    async def main() -> None:
        async with announcements() as box, client(srv) as c:
            await c.task("announce", {"path": box.path, "ms": 600_000})
            busy_pid = await asyncio.wait_for(box.pids.get(), 10)
            processes = descendants(srv.pid)
            assert busy_pid in processes
            assert len(processes) >= 3  # the forkserver and two workers, at least
            # In a thread: this loop must go on to answer the server's 1001 close.
            assert await asyncio.to_thread(srv.stop, sig) == exit_code
            left = [pid for pid in processes if not wait_gone(pid)]
            assert left == [], f"processes left after signal {sig}: {left}"

    run(main)
