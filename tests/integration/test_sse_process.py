"""HTTP streaming against real ``python -m wsserver`` processes: shutdown, tasks, and
several nodes or ``--workers`` sharing one Redis (tickets and forwarded sends)."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.aio import run
from tests.support.clients import welcomed
from tests.support.cluster import node_args, write_files
from tests.support.metrics import value
from tests.support.redis_server import RedisServer
from tests.support.servers import RunningServer
from tests.support.streams import post_send, stream, streamed, ticket
from tests.support.tokens import KEYED_ENV, mint


def test_sigterm_ends_every_stream_with_a_close_event_1001(run_server: Any) -> None:
    srv = run_server("--drain-timeout", "5", env=KEYED_ENV)

    async def scenario() -> list[tuple[int | None, str | None]]:
        streams = [await streamed(srv, mint(f"u{n}")) for n in range(3)]
        socket = await welcomed(srv, mint("ws"))
        srv.proc.send_signal(signal.SIGTERM)
        ends = []
        for client in streams:
            code, messages = await client.until_closed()
            assert messages == []
            ends.append((code, client.close_reason))
        assert (await socket.until_closed())[0] == 1001
        return ends

    assert run(scenario) == [(1001, "server shutting down")] * 3
    assert srv.stop() == 0
    logs = srv.logs()
    assert "shutting down: closing 4 connection(s) with 1001" in logs
    assert "drain timeout" not in logs


def test_tasks_run_for_a_streaming_client(run_server: Any) -> None:
    srv = run_server("--task-workers", "1", env=KEYED_ENV)

    async def scenario() -> None:
        client = await streamed(srv, mint("alice"))
        result = await client.ask({"type": "task", "name": "primes", "args": {"limit": 100},
                                   "id": 1})
        assert result == {"type": "result", "name": "primes", "value": 25, "id": 1}
        result = await client.ask({"type": "task", "name": "sha256",
                                   "args": {"data": "a", "rounds": 2}})
        once = hashlib.sha256(b"a").digest()
        assert result["value"] == hashlib.sha256(once).hexdigest()

    run(scenario)
    assert value(srv, "wsserver_connections_accepted_by_transport_total", transport="sse") == 1


# --- several processes on one Redis ----------------------------------------------------


@pytest.fixture
def nodes(run_server: Any, redis: RedisServer, tmp_path: Path) -> Any:
    config, key = write_files(tmp_path / "files")

    def start(name: str, *extra: str) -> RunningServer:
        node: RunningServer = run_server(*node_args(redis.url, name, config, key, *extra))
        node.wait_for_log(r"broker: Redis at \S+ is up")
        return node

    return start


@pytest.mark.slow
def test_a_ticket_and_the_sends_work_on_any_node(nodes: Any) -> None:
    a, b = nodes("a"), nodes("b")

    async def scenario() -> None:
        issued = (await ticket(b, mint("alice"))).json()["ticket"]
        client = await streamed(a, ticket=issued)  # issued by b, taken on a
        assert client.user == "alice"
        # Sends through either node, one after the other: in order, on a's stream.
        for n in range(10):
            via = a if n % 2 else b
            answer = await post_send(via, client.session, f'{{"type":"echo","data":{n}}}')
            assert answer.status_code == 202, answer.text
        assert [(await client.recv() or {})["data"] for _ in range(10)] == list(range(10))
        # A node that is gone is nobody's: its streams' ids are unknown (404).
        session = client.session
        await client.aclose()
        a.stop()
        gone = await post_send(b, session, '{"type":"ping"}')
        assert gone.status_code == 404

    run(scenario)
    assert value(b, "wsserver_sse_sends_total", outcome="forwarded") == 5


@pytest.mark.slow
def test_two_workers_serve_one_stream_whichever_takes_the_send(nodes: Any) -> None:
    # Each POST is a new connection: the kernel hands it to either worker.
    served = nodes("w", "--workers", "2", "--handshake-rate", "1000",
                   "--handshake-burst", "1000", "--message-rate", "1000",
                   "--message-burst", "1000")

    async def scenario() -> None:
        issued = (await ticket(served, mint("alice"))).json()["ticket"]
        client = await streamed(served, ticket=issued)
        for n in range(30):
            answer = await post_send(served, client.session,
                                     f'{{"type":"echo","data":{n}}}')
            assert answer.status_code == 202, answer.text
        assert [(await client.recv() or {})["data"] for _ in range(30)] == list(range(30))

    run(scenario)


def test_a_broker_that_is_down_is_503_for_tickets(
    run_server: Any, redis: RedisServer, tmp_path: Path
) -> None:
    config, key = write_files(tmp_path / "files")
    node = run_server(*node_args(redis.url, "a", config, key))
    node.wait_for_log(r"broker: Redis at \S+ is up")

    async def scenario() -> None:
        issued = (await ticket(node, mint("alice"))).json()["ticket"]
        redis.stop()
        node.wait_for_log(r"broker: Redis at \S+ is down")
        answer = await ticket(node, mint("alice"))
        assert answer.status_code == 503 and answer.headers["retry-after"]
        refused = await stream(node, ticket=issued)
        assert refused.status == 503 and refused.headers["retry-after"]
        assert refused.json()["error"] == "unavailable"

    run(scenario)
