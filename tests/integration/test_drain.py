"""``--drain-rate``: on SIGTERM the connections close with 1012 at a set pace
(a real ``python -m wsserver``, real clients, a real SIGTERM)."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from tests.support.aio import run
from tests.support.clients import AsyncClient, welcomed
from tests.support.http import fetch
from tests.support.servers import NO_HANDSHAKE_LIMIT, RunningServer, free_port
from tests.support.tokens import KEYED_ENV as KEYED
from tests.support.tokens import mint

CLIENTS = 30


async def closes_after_sigterm(srv: RunningServer, clients: list[AsyncClient],
                               timeout: float = 15) -> list[tuple[float, int | None, str | None]]:
    """SIGTERM, then each client's (seconds until its close, code, reason), in
    the order they closed."""

    async def closed(client: AsyncClient) -> tuple[float, int | None, str | None]:
        code, _ = await client.until_closed(timeout)
        return time.monotonic() - start, code, client.close_reason

    start = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    return sorted(await asyncio.gather(*(closed(c) for c in clients)))


def most_in_any_window(times: list[float], window: float) -> int:
    return max(sum(1 for t in times if start <= t < start + window) for start in times)


def test_drain_rate_closes_with_1012_at_the_pace_asked(run_server: Any) -> None:
    internal = free_port()
    srv = run_server("--drain-rate", "20", "--drain-timeout", "10", "--internal-port",
                     str(internal), *NO_HANDSHAKE_LIMIT, env=KEYED)

    # /readyz answers 503 while the drain goes on (on the internal listener,
    # which stays up until the end; the public one stops accepting at once).
    async def readiness_during() -> int:
        await asyncio.to_thread(srv.wait_for_log, "shutting down")
        answer = await asyncio.to_thread(fetch, f"http://127.0.0.1:{internal}/readyz")
        return answer.status

    async def both() -> tuple[list[tuple[float, int | None, str | None]], int]:
        clients = [await welcomed(srv, mint(f"u{n}")) for n in range(CLIENTS)]
        closes, status = await asyncio.gather(closes_after_sigterm(srv, clients),
                                              readiness_during())
        return closes, status

    closes, ready_status = run(both)
    assert ready_status == 503
    assert {(code, reason) for _, code, reason in closes} == {(1012, "service restart")}
    times = [t for t, _, _ in closes]
    # 30 connections at 20 per second: about 1.5 s from the first to the last,
    # never a burst (at most 20 in any second, with a tick's worth of slack).
    assert times[-1] - times[0] >= 1.2, times
    assert most_in_any_window(times, 1.0) <= 23, times
    assert srv.stop() == 0
    assert "closing 30 connection(s) with 1012 at 20 per second" in srv.logs()


def test_what_is_left_at_the_deadline_is_closed_at_once(run_server: Any) -> None:
    srv = run_server("--drain-rate", "2", "--drain-timeout", "2", *NO_HANDSHAKE_LIMIT,
                     env=KEYED)

    async def scenario() -> list[tuple[float, int | None, str | None]]:
        clients = [await welcomed(srv, mint(f"u{n}")) for n in range(CLIENTS)]
        return await closes_after_sigterm(srv, clients)

    closes = run(scenario)
    assert {code for _, code, _ in closes} == {1012}
    times = [t for t, _, _ in closes]
    # A few at the pace, then every other one together, all within the timeout.
    assert most_in_any_window(times, 0.5) >= CLIENTS - 5, times
    assert times[-1] < 2.5, times
    assert srv.stop() == 0


def test_without_drain_rate_every_connection_gets_1001_at_once(run_server: Any) -> None:
    srv = run_server("--drain-timeout", "5", *NO_HANDSHAKE_LIMIT, env=KEYED)

    async def scenario() -> list[tuple[float, int | None, str | None]]:
        clients = [await welcomed(srv, mint(f"u{n}")) for n in range(CLIENTS)]
        return await closes_after_sigterm(srv, clients)

    closes = run(scenario)
    assert {(code, reason) for _, code, reason in closes} == {(1001, "server shutting down")}
    times = [t for t, _, _ in closes]
    assert times[-1] - times[0] < 0.5, times
    assert srv.stop() == 0
