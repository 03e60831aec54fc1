"""The proxies in a real server process: what its log never holds, and a hanging
backend under load that other users do not feel."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.aio import run
from tests.support.backend import AppBackend
from tests.support.clients import refused, welcomed, welcomed_without_token
from tests.support.servers import RunningServer, ServerFactory
from tests.support.tokens import KEYED_ENV, mint

ROOMS = """
[rooms]
join = "anyone"
publish = "members"

[rooms.namespaces.team]
join = "proxy"
publish = "members"

[rooms.namespaces.mod]
join = "anyone"
publish = "proxy"
"""
PROXY_KEY = "proxy-key-" + "q" * 32


def start(run_server: ServerFactory, backend: AppBackend, tmp_path: Path,
          *extra: str) -> RunningServer:
    config = tmp_path / "wsserver.toml"
    config.write_text(ROOMS)
    key = tmp_path / "proxy.key"
    key.write_text(PROXY_KEY)
    return run_server("--config", str(config), "--proxy-key-file", str(key),
                      *backend.proxy_args(), *extra, env=KEYED_ENV)


def test_cookies_headers_bodies_and_the_key_never_reach_the_log(
    run_server: ServerFactory, app_backend: AppBackend, tmp_path: Path
) -> None:
    srv = start(run_server, app_backend, tmp_path, "--log-level", "DEBUG",
                "--proxy-timeout", "0.5")
    markers = ["COOKIEMARKER1", "BEARERMARKER2", "RPCMARKER3", "PUBLISHMARKER4", "JOINMARKER5"]
    app_backend.sessions["COOKIEMARKER1"] = "alice"
    app_backend.sessions["BEARERMARKER2"] = "bob"
    app_backend.teams["team:t"] = {"alice"}

    async def scenario() -> None:
        alice = await welcomed_without_token(
            srv, "alice", headers={"Cookie": "session=COOKIEMARKER1"})
        await welcomed_without_token(srv, "bob",
                                     headers={"Authorization": "Bearer BEARERMARKER2"})
        await alice.ask({"type": "rpc", "method": "add", "data": [1], "note": "RPCMARKER3"})
        await alice.join("mod:x")
        await alice.ask({"type": "publish", "room": "mod:x", "data": "PUBLISHMARKER4"})
        await alice.ask({"type": "join", "room": "team:t", "data": "JOINMARKER5"})
        # Failures are logged (without what was sent):
        for kind in ("connect", "rpc", "publish", "subscribe"):
            app_backend.fault(kind, "500")
        error = await refused(srv, headers={"Cookie": "session=COOKIEMARKER1"})
        assert error.status == 503
        reply = await alice.ask({"type": "rpc", "method": "RPCMARKER3", "data": "RPCMARKER3"})
        assert reply["code"] == "unavailable"
        reply = await alice.ask({"type": "publish", "room": "mod:x", "data": "PUBLISHMARKER4"})
        assert reply["code"] == "unavailable"
        reply = await alice.ask({"type": "join", "room": "team:t", "data": "JOINMARKER5"})
        assert reply["code"] == "unavailable"
        app_backend.fault("connect", "hang")
        error = await refused(srv, headers={"Cookie": "session=COOKIEMARKER1"})
        assert error.status == 503

    run(scenario)
    srv.stop()
    logs = srv.logs()
    assert "connect proxy http://127.0.0.1:" in logs and "HTTP 500" in logs
    assert "no answer within 0.5 s (timeout)" in logs
    assert "rpc proxy" in logs and "publish proxy" in logs and "subscribe proxy" in logs
    for secret in [*markers, PROXY_KEY]:
        assert secret not in logs, secret
    # The backend did receive them: the test's markers were really sent.
    assert any("COOKIEMARKER1" in str(c.body) for c in app_backend.calls_of("connect"))
    assert all(c.headers["X-Wsserver-Proxy-Key"] == PROXY_KEY for c in app_backend.calls)


@pytest.mark.slow
def test_a_hanging_backend_under_load_leaves_other_users_unaffected(
    run_server: ServerFactory, app_backend: AppBackend, tmp_path: Path
) -> None:
    srv = start(run_server, app_backend, tmp_path, "--proxy-timeout", "1",
                "--proxy-max-concurrency", "8", "--message-rate", "1000",
                "--message-burst", "1000", "--max-connections-per-ip", "1000",
                "--handshake-rate", "1000", "--handshake-burst", "1000",
                "--room-publish-rate", "1000", "--room-publish-burst", "1000")
    app_backend.fault("rpc", "hang")
    app_backend.fault("publish", "hang")
    duration = 3.0

    async def scenario() -> dict[str, Any]:
        callers = [await welcomed(srv, mint(f"caller{n}")) for n in range(20)]
        talkers = [await welcomed(srv, mint(f"talker{n}")) for n in range(4)]
        for conn in [*callers, *talkers]:
            await conn.join("lobby")
        for conn in callers[:5]:
            await conn.join("mod:x")
        rpc_waits: list[float] = []
        echo_rtts: list[float] = []
        delivered = 0
        stop = time.monotonic() + duration

        async def call_rpc(conn: Any) -> None:
            n = 0
            while time.monotonic() < stop:
                n += 1
                started = time.monotonic()
                reply = await conn.ask({"type": "rpc", "method": "slow", "id": n},
                                       skip={"message"})
                assert reply["code"] == "unavailable", reply
                rpc_waits.append(time.monotonic() - started)

        async def moderate(conn: Any) -> None:
            while time.monotonic() < stop:
                reply = await conn.ask({"type": "publish", "room": "mod:x", "data": 1},
                                       skip={"message"})
                assert reply["code"] == "unavailable", reply

        async def talk(conn: Any, n: int) -> None:
            nonlocal delivered
            seq = 0
            while time.monotonic() < stop:
                seq += 1
                started = time.monotonic()
                reply = await conn.ask({"type": "echo", "data": seq}, skip={"message"})
                echo_rtts.append(time.monotonic() - started)
                assert reply == {"type": "echo", "data": seq}
                if seq % 5 == 0:
                    await conn.send({"type": "publish", "room": "lobby",
                                     "data": f"{n}-{seq}", "id": seq})
                    mine = await conn.next(lambda m, seq=seq: m.get("id") == seq)
                    assert mine["type"] == "message" and mine["data"] == f"{n}-{seq}", mine
                    delivered += 1

        await asyncio.gather(*(call_rpc(c) for c in callers[5:]),
                             *(moderate(c) for c in callers[:5]),
                             *(talk(c, n) for n, c in enumerate(talkers)))
        return {"rpc_waits": rpc_waits, "echo_rtts": echo_rtts, "delivered": delivered}

    result = run(scenario, timeout=60)
    rtts = sorted(result["echo_rtts"])
    p99 = rtts[int(len(rtts) * 0.99) - 1]
    # Every hung call was answered unavailable within the timeout (plus slack);
    # beyond --proxy-max-concurrency, at once.
    assert max(result["rpc_waits"]) < 1.6
    assert min(result["rpc_waits"]) < 0.1
    # The other users' echoes and publishes kept flowing, fast.
    assert len(rtts) > 200 and result["delivered"] > 40
    assert statistics.median(rtts) < 0.02, statistics.median(rtts)
    assert p99 < 0.15, p99
    # The backend never saw more than the bound of each kind at once.
    rpc_calls = len(app_backend.calls_of("rpc"))
    assert rpc_calls <= 8 * (duration / 1 + 2), rpc_calls
    metrics = srv.metrics()
    assert 'wsserver_proxy_requests_total{kind="rpc",outcome="timeout"}' in metrics
    assert 'wsserver_proxy_requests_total{kind="rpc",outcome="overloaded"}' in metrics
    print(f"echo p50 {statistics.median(rtts) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"max {rtts[-1] * 1000:.1f} ms over {len(rtts)} echoes; {rpc_calls} rpc calls reached "
          f"the backend, {len(result['rpc_waits'])} answered")
