"""Real nginx, configured by the shipped ``deploy/nginx-cluster.conf``, in front of two
real nodes sharing one real ``redis-server``: clients through the one public port
land on both nodes and every publish reaches every client exactly once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.clients import ROOM_TRAFFIC, welcomed_sync
from tests.support.cluster import api, node_args, write_files
from tests.support.deploy import Nginx, nginx_available
from tests.support.metrics import value
from tests.support.redis_server import RedisServer
from tests.support.servers import RunningServer
from tests.support.tokens import mint
from tests.support.waiting import poll

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not nginx_available(), reason="needs nginx (Debian: nginx-light)"),
]


@pytest.fixture
def nginx_for(tmp_path: Path) -> Iterator[Callable[[list[int]], Nginx]]:
    started: list[Nginx] = []

    def start(ports: list[int]) -> Nginx:
        nginx = Nginx(tmp_path / "nginx", 0, upstream_ports=ports)
        started.append(nginx)
        nginx.start()
        return nginx

    yield start
    for nginx in started:
        nginx.stop()


def test_two_nodes_behind_nginx_deliver_to_everyone_once(
    run_server: Callable[..., RunningServer], redis: RedisServer, tmp_path: Path,
    nginx_for: Callable[[list[int]], Nginx],
) -> None:
    config, key = write_files(tmp_path / "files")
    nodes = [
        run_server(*node_args(redis.url, name, config, key, "--trusted-proxies", "127.0.0.1"))
        for name in ("a", "b")
    ]
    for node in nodes:
        node.wait_for_log(r"broker: Redis at \S+ is up")
    nginx = nginx_for([node.port for node in nodes])
    members = [welcomed_sync(nginx, mint(f"u{n}")) for n in range(6)]
    for member in members:
        member.join("chat:all")
    # least_conn spreads the six over both nodes.
    counts = [value(node, "wsserver_connections") for node in nodes]
    assert sorted(counts) == [3, 3], (counts, nginx.error_log())
    assert sorted(n["name"] for n in api(nodes[0], "/api/nodes")["nodes"]) == ["a", "b"]
    assert api(nodes[1], "/api/presence?room=chat:all")["connections"] == 6

    members[0].send({"type": "publish", "room": "chat:all", "data": "hello", "id": 7})
    poll(lambda: api(nodes[1], "/api/history?room=chat:all")["offset"] == 1, "published")
    assert api(nodes[1], "/api/publish", {"room": "chat:all", "data": "end"})["offset"] == 2
    for n, member in enumerate(members):
        got = member.messages_until("end")
        assert [(m["data"], m["from"], m["offset"]) for m in got] == [("hello", "u0", 1)], got
        assert ("id" in got[0]) == (n == 0)
        assert member.ask({"type": "ping"}, skip=ROOM_TRAFFIC) == {"type": "pong"}
