"""``--workers N`` as an operator sees it: metrics and stats for the whole machine,
a stuck worker replaced, systemd's watchdog only while every worker is alive.

Real ``python -m wsserver --workers 2`` processes on a real ``redis-server``,
real ``websockets`` clients, a real ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import SyncClient, welcomed_sync
from tests.support.cluster import api, node_args, write_files
from tests.support.metrics import families
from tests.support.notify import path_socket
from tests.support.redis_server import RedisServer
from tests.support.servers import RunningServer
from tests.support.tokens import mint
from tests.support.waiting import poll

pytestmark = pytest.mark.slow

StartWorkers = Callable[..., RunningServer]
#: Scrapes per check: each is a new TCP connection, and the kernel hands each
#: to either worker, so a per-worker answer shows within a few.
SCRAPES = 24


@pytest.fixture
def start_workers(
    run_server: Callable[..., RunningServer], redis: RedisServer, tmp_path: Path
) -> StartWorkers:
    """``start_workers(*extra_args)``: ``--workers 2`` on the test's Redis."""
    config, key = write_files(tmp_path / "files")

    def start(*extra: str, env: dict[str, str] | None = None) -> RunningServer:
        served = run_server(*node_args(redis.url, "w", config, key, "--workers", "2",
                                       "--handshake-rate", "1000", "--handshake-burst", "1000",
                                       *extra), env=env)
        poll(lambda: len(api(served, "/api/nodes")["nodes"]) == 2, "both workers registered")
        return served

    return start


def worker_pids(served: RunningServer) -> dict[int, int]:
    """Worker number → pid of the workers serving now (the last line of each)."""
    pids: dict[int, int] = {}
    for number, pid in re.findall(r"worker (\d+) serving \(pid (\d+)\)", served.logs()):
        pids[int(number)] = int(pid)
    return pids


def on_both_workers(served: RunningServer, users: str = "m") -> list[SyncClient]:
    """Clients opened until each worker holds at least one (the kernel picks)."""
    members: list[SyncClient] = []

    def both() -> bool:
        members.append(welcomed_sync(served, mint(f"{users}{len(members)}")))
        nodes = api(served, "/api/nodes")["nodes"]
        return len(nodes) == 2 and all(n["connections"] for n in nodes)

    poll(both, "clients on both workers", every=0)
    return members


def scrape(served: RunningServer) -> dict[str, list[tuple[dict[str, str], float]]]:
    """One /metrics answer: sample name → [(labels, value)]."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in families(served.metrics()):
        for found in family.samples:
            samples.setdefault(found.name, []).append((found.labels, found.value))
    return samples


def stats(served: RunningServer) -> dict[str, Any]:
    with urllib.request.urlopen(served.url + "/stats", timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def test_every_scrape_answers_for_both_workers(start_workers: StartWorkers) -> None:
    served = start_workers()
    members = on_both_workers(served)
    for member in members:
        member.send({"type": "ping", "id": 1})
        member.next(lambda m: m["type"] == "pong")
    total = len(members)
    # The per-worker gauges are refreshed every second: let both catch up once.
    poll(lambda: stats(served)["users"] == total, "the users of both workers in /stats")
    for _ in range(SCRAPES):
        samples = scrape(served)
        # Gauges of live counts: summed over the workers.
        assert samples["wsserver_connections"] == [({}, total)], samples["wsserver_connections"]
        # Counters: summed over the workers.
        assert samples["wsserver_connections_accepted_total"] == [({}, total)]
        assert dict(
            (labels["type"], value) for labels, value in samples["wsserver_messages_total"]
        ) == {"ping": total}
        # Per-worker gauges carry the worker's number.
        users = {labels["worker"]: value for labels, value in samples["wsserver_users"]}
        assert set(users) == {"0", "1"} and sum(users.values()) == total, users
        answer = stats(served)
        assert answer["connections"] == total and answer["messages"] == total, answer
        assert answer["users"] == total, answer


def pongs_within(members: list[SyncClient], timeout: float) -> list[bool | None]:
    """Ping every member at once, then for each: True when its pong came within
    ``timeout`` (all told), False when nothing came, None when it is closed."""
    sent: list[bool] = []
    for member in members:
        try:
            member.send({"type": "ping", "id": 1})
            sent.append(True)
        except Exception:  # websockets' ConnectionClosed
            sent.append(False)
    deadline = time.monotonic() + timeout
    answers: list[bool | None] = []
    for member, ok in zip(members, sent, strict=True):
        if not ok:
            answers.append(None)
            continue
        try:
            reply = member.recv(max(0.01, deadline - time.monotonic()))
        except AssertionError:
            answers.append(False)
            continue
        answers.append(None if reply is None else reply["type"] == "pong")
    return answers


def connections_per_worker(served: RunningServer) -> dict[str, int]:
    return {n["name"]: n["connections"] for n in api(served, "/api/nodes")["nodes"]}


def test_a_stuck_worker_is_replaced_and_the_other_workers_clients_carry_on(
    start_workers: StartWorkers,
) -> None:
    timeout = 2.0
    served = start_workers("--worker-timeout", str(timeout))
    members = on_both_workers(served)
    # /api/nodes reports each worker's heartbeat: wait until it has them all.
    counts = poll(lambda: (c := connections_per_worker(served)) and
                  sum(c.values()) == len(members) and c, "every client in /api/nodes")
    on_stuck, on_other = counts["w-0"], counts["w-1"]
    stuck = worker_pids(served)[0]
    stopped = time.monotonic()
    os.kill(stuck, signal.SIGSTOP)
    try:
        # While it is stuck, the other worker's clients are answered at once.
        answered = pongs_within(members, 1.0)
        assert answered.count(True) == on_other and answered.count(False) == on_stuck, answered
        found = served.wait_for_log(
            rf"ERROR wsserver.supervisor: worker 0 \(pid {stuck}\) silent for (\d+\.\d) s", 15)
        assert timeout <= float(found.group(1)) < timeout + 1.5, found.group(0)
        served.wait_for_log(rf"worker 0 serving \(pid (?!{stuck}\b)\d+\)", 15)
        replaced = time.monotonic() - stopped
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGCONT)
    print(f"worker replaced {replaced:.2f} s after SIGSTOP (--worker-timeout {timeout})")
    assert replaced < timeout + 10, replaced
    # The stuck worker's clients were dropped with it; the others never noticed.
    after = pongs_within(members, 5.0)
    assert [a for a, b in zip(answered, after, strict=True) if b] == [True] * on_other
    assert after.count(None) == on_stuck, after
    poll(lambda: connections_per_worker(served) == {"w-0": 0, "w-1": on_other},
         "the replacement registered")
    # The dead worker's gauges left the machine's sums with it.
    poll(lambda: stats(served)["connections"] == on_other, "the stuck worker's gauges gone")
    assert served.stop(signal.SIGTERM) == 0


def test_systemd_watchdog_stops_while_a_worker_is_stuck(
    start_workers: StartWorkers,
) -> None:
    with path_socket() as notify:
        served = start_workers(
            "--worker-timeout", "4",
            env={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "1000000"},
        )
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", timeout=5)
        stuck = worker_pids(served)[0]
        stopped = time.monotonic()
        os.kill(stuck, signal.SIGSTOP)
        try:
            # Pings every 0.5 s until the worker is missed; none while it is stuck.
            pings: list[float] = []
            while time.monotonic() - stopped < 3.5:
                if notify.pending() and "WATCHDOG=1" in notify.receive():
                    pings.append(time.monotonic() - stopped)
                time.sleep(0.01)
            assert not [t for t in pings if t > 1.5], pings
            served.wait_for_log(rf"worker 0 \(pid {stuck}\) silent for", 10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck, signal.SIGCONT)
        served.wait_for_log(rf"worker 0 serving \(pid (?!{stuck}\b)\d+\)", 15)
        # Every worker alive again: the pings resume.
        notify.wait_for("WATCHDOG=1", timeout=5)
        assert served.stop(signal.SIGTERM) == 0
