"""Several real ``python -m wsserver`` nodes on one real ``redis-server``: their files,
command line and API.

Used by the cluster integration tests and the nginx end-to-end test, which
drive the nodes from plain code with :func:`tests.support.clients.welcomed_sync`
clients.
"""

from __future__ import annotations

from email.message import Message
from pathlib import Path
from typing import Any

from tests.support.http import fetch
from tests.support.servers import RunningServer
from tests.support.tokens import SECRET

KEY = "cluster-api-key-0123456789-abcdefghijklmnop"
#: Rooms: the default namespace open to everyone; ``chat:*`` with history,
#: presence and join/leave events.
ROOMS = """
[rooms]
join = "anyone"
publish = "members"

[rooms.namespaces.chat]
join = "anyone"
publish = "members"
history_size = 100
presence = true
join_leave = true
"""


def write_files(directory: Path, rooms: str = ROOMS) -> tuple[Path, Path]:
    """The rooms config file (``rooms``, TOML) and the API key file every node of a
    test shares."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "cluster.toml"
    config.write_text(rooms)
    key = directory / "api-key"
    key.write_text(KEY + "\n")
    return config, key


def node_args(redis_url: str, name: str, config: Path, key: Path, *extra: str) -> list[str]:
    """The command line of one node (fast probes and heartbeats, so tests take seconds)."""
    return [
        "--jwt-secret", SECRET, "--broker", redis_url, "--node-name", name,
        "--config", str(config), "--api-key-file", str(key),
        "--broker-probe-interval", "0.5", "--broker-heartbeat", "0.5",
        "--broker-node-ttl", "2", *extra,
    ]


def http(url: str, body: Any = None, *, key: str | None = KEY,
         method: str | None = None) -> tuple[int, Message, Any]:
    """(status, headers, JSON body or raw bytes) of a GET, or a POST of ``body``."""
    answer = fetch(url, body, headers={} if key is None else {"X-API-Key": key}, method=method)
    try:
        return answer.status, answer.headers, answer.json()
    except ValueError:
        return answer.status, answer.headers, answer.body


def api(node: RunningServer, path: str, body: Any = None) -> Any:
    """The JSON answer of a 200 from ``node``'s API."""
    status, _, answer = http(node.url + path, body)
    assert status == 200, (path, status, answer)
    return answer
