"""``--workers N`` as an operator sees it: metrics and stats for the whole machine,
a stuck worker replaced, systemd's watchdog only while every worker is alive.

Real ``python -m wsserver --workers 2`` processes on a real ``redis-server``,
real ``websockets`` clients, a real ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import SyncClient, welcomed_sync
from tests.support.cluster import api, node_args, write_files
from tests.support.metrics import families
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
