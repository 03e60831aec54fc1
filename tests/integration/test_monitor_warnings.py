"""What operators see: the monitor's log lines and the connection gauges."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from tests.support.aio import run
from tests.support.metrics import reaches, read
from tests.support.raw import raw_connect, raw_welcomed
from tests.support.servers import NO_HANDSHAKE_LIMIT, RunningServer
from tests.support.tokens import EVERY_ROOM, KEYED_ENV, mint

Start = Callable[..., RunningServer]

NEAR_CAP = re.compile(r"(\w+) wsserver\.monitor: connections near the cap: (\d+) of 10")


async def wait_for_log(srv: RunningServer, pattern: str) -> re.Match[str]:
    return await asyncio.to_thread(srv.wait_for_log, pattern, 10.0)


def test_monitor_warns_at_90_percent_of_the_cap(run_server: Start) -> None:
    srv = run_server("--monitor-interval", "0.2", "--max-connections", "10",
                     *NO_HANDSHAKE_LIMIT, env=KEYED_ENV)

    async def scenario() -> None:
        await wait_for_log(srv, r"INFO wsserver\.monitor: connections=0/10 ")
        opened = [await raw_welcomed(srv, mint(f"u{n}", **EVERY_ROOM)) for n in range(8)]
        await wait_for_log(srv, r"INFO wsserver\.monitor: connections=8/10 \(80%\) users=8 ")
        assert not NEAR_CAP.search(srv.logs()), "80 % is below the warning level"

        opened.append(await raw_welcomed(srv, mint("u8", **EVERY_ROOM)))
        await wait_for_log(srv, r"WARNING wsserver\.monitor: connections near the cap: 9 of 10")

        for conn in opened[4:]:
            await conn.close_cleanly()
        await wait_for_log(srv, r"INFO wsserver\.monitor: connections=4/10 \(40%\)")
        # Every warning line was a WARNING about 9 (the only count at or over 90 %).
        warnings = NEAR_CAP.findall(srv.logs())
        assert warnings and set(warnings) == {("WARNING", "9")}
        for conn in opened[:4]:
            await conn.close_cleanly()

    run(scenario)


def test_connection_gauges_follow_connects_and_disconnects(run_server: Start) -> None:
    srv = run_server(*NO_HANDSHAKE_LIMIT, env=KEYED_ENV)

    async def gauges() -> tuple[float, float]:
        return (await read(srv, "wsserver_connections"),
                await read(srv, "wsserver_users"))

    async def scenario() -> None:
        assert await gauges() == (0, 0)
        a1, a2, b = (await raw_welcomed(srv, mint("alice", **EVERY_ROOM)), await raw_welcomed(srv, mint("alice", **EVERY_ROOM)),
                     await raw_welcomed(srv, mint("bob", **EVERY_ROOM)))
        assert await gauges() == (3, 2)

        # A connection refused with 4001 is never counted.
        bad = await raw_connect(srv, {"Authorization": "Bearer nope"})
        code, _ = await bad.read_until_close()
        assert code == 4001
        assert await gauges() == (3, 2)
        await bad.close_cleanly_after_server_close()

        await a1.close_cleanly()
        await reaches(srv, 2, "wsserver_connections")
        assert await gauges() == (2, 2)
        a2.reset()  # vanishes without a close frame
        await reaches(srv, 1, "wsserver_connections")
        assert await gauges() == (1, 1)
        b.drop()
        await reaches(srv, 0, "wsserver_connections")
        assert await gauges() == (0, 0)
        assert await read(srv, "wsserver_closes_total", code="4001") == 1

    run(scenario)
