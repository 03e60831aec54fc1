"""Several real ``python -m wsserver`` nodes on one real ``redis-server``, and their clients.

Used by the cluster integration tests and the nginx end-to-end test. Clients
are ``websockets``' synchronous ones (a thread-free, loop-free client per
connection); every helper is bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.support.servers import RunningServer
from tests.support.tokens import SECRET, mint

T = TypeVar("T")

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
WAIT = 10.0


def write_files(directory: Path) -> tuple[Path, Path]:
    """The rooms config file and the API key file every node of a test shares."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "cluster.toml"
    config.write_text(ROOMS)
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


def poll(check: Callable[[], T | None], what: str, timeout: float = WAIT,
         every: float = 0.05) -> T:
    """Until ``check()`` answers something true; its answer. Fails after ``timeout``.

    For states nothing announces (an HTTP endpoint's answer, another node's view).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s (last: {last!r})")
        time.sleep(every)


def http(url: str, body: Any = None, *, key: str | None = KEY,
         method: str | None = None) -> tuple[int, Message, Any]:
    """(status, headers, JSON body or raw bytes) of a GET, or a POST of ``body``."""
    headers = {} if key is None else {"X-API-Key": key}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, head, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            status, head, raw = error.code, error.headers, error.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw


def api(node: RunningServer, path: str, body: Any = None) -> Any:
    """The JSON answer of a 200 from ``node``'s API."""
    status, _, answer = http(node.url + path, body)
    assert status == 200, (path, status, answer)
    return answer


def metric(node: RunningServer, name: str) -> float:
    """One unlabelled sample of ``node``'s /metrics (0 when absent)."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", node.metrics(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


class Client:
    """One authenticated connection, past its ``welcome``."""

    def __init__(self, url: str, user: str, **claims: Any) -> None:
        self.user = user
        headers = {"Authorization": f"Bearer {mint(user, **claims)}"}
        # Entered as a context manager, as websockets (17.1+) wants it used.
        self._stack = contextlib.ExitStack()
        self.conn: ClientConnection = self._stack.enter_context(connect(
            url, additional_headers=headers, open_timeout=WAIT, close_timeout=2, max_queue=None
        ))
        try:
            welcome = self.recv()
        except BaseException:
            self._stack.close()
            raise
        assert welcome["type"] == "welcome", welcome
        self.welcome = welcome

    def send(self, message: dict[str, Any]) -> None:
        self.conn.send(json.dumps(message))

    def recv(self, timeout: float = WAIT) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self.conn.recv(timeout=timeout))
        return message

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` and return the next message of a type it can be answered with
        (skipping room traffic such as ``message`` and ``user_joined``)."""
        self.send(message)
        return self.next(lambda m: m["type"] not in ROOM_TRAFFIC)

    def next(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = WAIT
             ) -> dict[str, Any]:
        """The next message ``wanted`` accepts; others are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            if wanted(message):
                return message

    def join(self, room: str) -> dict[str, Any]:
        reply = self.ask({"type": "join", "room": room})
        assert reply["type"] == "joined", reply
        return reply

    def messages_until(self, marker: Any, timeout: float = WAIT) -> list[dict[str, Any]]:
        """Every room message and gap up to the message whose data is ``marker``
        (excluded). One node's pub/sub connection delivers in order, so nothing
        published before the marker can follow it."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            if message["type"] == "message" and message["data"] == marker:
                return got
            if message["type"] in ("message", "gap"):
                got.append(message)

    def messages_until_any(self, marker: Any, timeout: float = WAIT) -> list[dict[str, Any]]:
        """Everything received before the room message whose data is ``marker``."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            if message["type"] == "message" and message["data"] == marker:
                return got
            got.append(message)

    def closed_with(self, timeout: float = WAIT) -> int | None:
        """The close code once the server closed (reading past whatever was still queued)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.conn.recv(timeout=max(0.01, deadline - time.monotonic()))
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else None
        raise AssertionError(f"{self.user}: not closed after {timeout} s")

    def close(self) -> None:
        self._stack.close()


ROOM_TRAFFIC = {"message", "user_joined", "user_left", "gap"}


class Clients:
    """Every client a test opened, closed at the end."""

    def __init__(self) -> None:
        self.opened: list[Client] = []

    def open(self, node: RunningServer | str, user: str, **claims: Any) -> Client:
        url = node if isinstance(node, str) else node.ws_url
        client = Client(url, user, **claims)
        self.opened.append(client)
        return client

    def refused(self, node: RunningServer | str, user: str, **claims: Any) -> int | None:
        """Connect as ``user`` expecting a close before the welcome; its close code."""
        url = node if isinstance(node, str) else node.ws_url
        try:
            client = Client(url, user, **claims)
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else None
        self.opened.append(client)
        raise AssertionError(f"{user} was welcomed: {client.welcome}")

    def close(self) -> None:
        for client in self.opened:
            client.close()


def clients_fixture() -> Iterator[Clients]:
    opened = Clients()
    try:
        yield opened
    finally:
        opened.close()
