"""The API as an operator runs it: ``--internal-port``, ``--api-key-file``, the
``publish`` command, the key's length check. Real ``python -m wsserver``
processes, plain HTTP requests and a ``websockets`` client."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import SyncClient, welcomed_sync
from tests.support.http import fetch
from tests.support.servers import RunningServer
from tests.support.servers import run_cli as cli
from tests.support.tokens import SECRET, mint

KEY = "api-key-for-process-tests-0123456789-abcdef"
INTERNAL = re.compile(r"internal listener \(metrics, stats, API\) on http://(\S+):(\d+)/")


def http(url: str, body: Any = None, key: str | None = KEY) -> tuple[int, bytes]:
    """(status, body) of a GET, or a POST of ``body`` as JSON, with the API key."""
    answer = fetch(url, body, headers={} if key is None else {"X-API-Key": key})
    return answer.status, answer.body


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-key"
    path.write_text(KEY + "\n")  # a trailing newline, as editors and `echo` leave it
    return path


@pytest.fixture
def server(
    run_server: Callable[..., RunningServer], key_file: Path
) -> tuple[RunningServer, str]:
    """A server with an API key file and an internal port; (server, internal base URL)."""
    running = run_server("--jwt-secret", SECRET, "--api-key-file", str(key_file),
                         "--internal-port", "0")
    found = INTERNAL.search(running.logs())
    assert found, running.logs()
    assert found.group(1) == "127.0.0.1"
    return running, f"http://127.0.0.1:{found.group(2)}"


@pytest.fixture
def member(server: tuple[RunningServer, str]) -> Iterator[SyncClient]:
    """A client of the server granted and joined to room ``news``."""
    running, _ = server
    conn = welcomed_sync(running, mint("alice", rooms=["news"]))
    assert conn.ask({"type": "join", "room": "news"}) == {"type": "joined", "room": "news"}
    yield conn
    conn.close()


def assert_quiet(conn: SyncClient) -> None:
    assert conn.ask({"type": "ping", "id": "q"}) == {"type": "pong", "id": "q"}


# --- --internal-port -----------------------------------------------------------------


def test_internal_port_takes_metrics_stats_and_the_api(server: tuple[RunningServer, str]) -> None:
    running, internal = server
    public = running.url
    for path in ("/metrics", "/stats", "/api/rooms", "/api/nodes", "/api/nowhere"):
        assert http(public + path)[0] == 404, path
    assert http(public + "/api/publish", {"room": "news", "data": 1})[0] == 404
    status, body = http(internal + "/metrics")
    assert status == 200 and b"wsserver_connections" in body
    assert http(internal + "/stats")[0] == 200
    assert http(internal + "/api/rooms") == (200, b'{"rooms":{}}')
    assert http(internal + "/api/rooms", key=None)[0] == 401
    for base in (public, internal):
        status, body = http(base + "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"}), base
        assert http(base + "/readyz")[0] == 200, base
    # The WebSocket endpoint and the demo page stay public only.
    assert http(internal + "/ws")[0] == 404
    assert http(internal + "/")[0] == 404


def test_without_internal_port_everything_is_on_one_port(
    run_server: Callable[..., RunningServer], key_file: Path
) -> None:
    running = run_server("--jwt-secret", SECRET, "--api-key-file", str(key_file))
    assert not INTERNAL.search(running.logs())
    assert http(running.url + "/metrics")[0] == 200
    assert http(running.url + "/api/nodes")[0] == 200


def test_without_a_key_the_api_is_off_and_says_so(
    run_server: Callable[..., RunningServer],
) -> None:
    running = run_server("--jwt-secret", SECRET)
    running.wait_for_log(r"server API off \(no --api-key\)")
    assert http(running.url + "/api/rooms")[0] == 404


# --- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_a_short_api_key_is_a_config_error(command: str, tmp_path: Path) -> None:
    short = "k" * 31
    result = cli(command, "--port", "0", "--jwt-secret", SECRET, "--api-key", short)
    assert result.returncode == 2, result.stderr
    assert "--api-key" in result.stderr and "32" in result.stderr
    assert short not in result.stderr + result.stdout
    path = tmp_path / "short"
    path.write_text(short)
    result = cli(command, "--port", "0", "--jwt-secret", SECRET, "--api-key-file", str(path))
    assert result.returncode == 2, result.stderr
    assert "32" in result.stderr and short not in result.stderr


def test_an_unreadable_api_key_file_is_a_config_error(tmp_path: Path) -> None:
    result = cli("check-config", "--jwt-secret", SECRET,
                 "--api-key-file", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "--api-key-file" in result.stderr


def test_the_internal_port_must_differ_from_the_port() -> None:
    result = cli("check-config", "--jwt-secret", SECRET, "--port", "9000",
                 "--internal-port", "9000")
    assert result.returncode == 2
    assert "--internal-port" in result.stderr


# --- python -m wsserver publish ----------------------------------------------------------


def test_publish_command_reaches_the_member(
    server: tuple[RunningServer, str], member: SyncClient, key_file: Path
) -> None:
    _, internal = server
    result = cli("publish", "news", '{"headline": "hi", "n": [1, 2]}', "--url", internal,
                 "--api-key-file", str(key_file))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}
    assert member.recv() == {"type": "message", "room": "news", "from": None,
                                    "data": {"headline": "hi", "n": [1, 2]}}
    assert KEY not in result.stdout + result.stderr


def test_publish_command_finds_the_internal_port_itself(
    server: tuple[RunningServer, str], member: SyncClient, key_file: Path
) -> None:
    _, internal = server
    port = internal.rsplit(":", 1)[1]
    result = cli("publish", "news", "3", "--internal-port", port, "--api-key-file", str(key_file))
    assert result.returncode == 0, result.stderr
    assert member.recv()["data"] == 3


def test_publish_command_says_what_the_server_refused(
    server: tuple[RunningServer, str], member: SyncClient, key_file: Path, tmp_path: Path
) -> None:
    _, internal = server
    result = cli("publish", "BAD:room", "1", "--url", internal, "--api-key-file", str(key_file))
    assert result.returncode == 1
    assert "400" in result.stderr and "namespace" in result.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("w" * 40)
    result = cli("publish", "news", "1", "--url", internal, "--api-key-file", str(wrong))
    assert result.returncode == 1
    assert "401" in result.stderr and "API key" in result.stderr
    assert "w" * 40 not in result.stderr
    assert_quiet(member)


def test_publish_command_without_a_key_exits_2() -> None:
    result = cli("publish", "news", "1", "--url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "--api-key-file" in result.stderr


def test_publish_command_with_bad_json_exits_2(key_file: Path) -> None:
    result = cli("publish", "news", "{nope", "--url", "http://127.0.0.1:9",
                 "--api-key-file", str(key_file))
    assert result.returncode == 2
    assert "JSON" in result.stderr


def test_publish_command_cannot_reach_the_server_exits_1(
    key_file: Path, run_server: Callable[..., RunningServer]
) -> None:
    running = run_server("--jwt-secret", SECRET)
    url = running.url
    running.stop()
    result = cli("publish", "news", "1", "--url", url, "--api-key-file", str(key_file))
    assert result.returncode == 1
    assert "cannot reach" in result.stderr


# --- bodies against the listener's own cap ------------------------------------------------


def test_a_body_over_max_message_size_is_413_even_past_the_listeners_cap(
    server: tuple[RunningServer, str], member: SyncClient
) -> None:
    _, internal = server
    for size in (65_536, 70_000):  # the default --max-message-size is 65536
        status, body = http(internal + "/api/publish", {"room": "news", "data": "x" * size})
        assert status == 413, size
        assert json.loads(body)["error"] == "too_large"
    # Without the key the answer is 401, not a size verdict.
    status, _ = http(internal + "/api/publish", {"room": "news", "data": "x" * 70_000}, key=None)
    assert status == 401
    assert_quiet(member)


def test_a_large_max_message_size_admits_large_api_bodies(
    run_server: Callable[..., RunningServer], key_file: Path
) -> None:
    running = run_server("--jwt-secret", SECRET, "--api-key-file", str(key_file),
                         "--max-message-size", "300000")
    status, body = http(running.url + "/api/publish", {"room": "news", "data": "x" * 200_000})
    assert (status, body) == (200, b"{}")
    status, _ = http(running.url + "/api/publish", {"room": "news", "data": "x" * 310_000})
    assert status == 413


def test_publish_to_the_public_port_of_a_split_server_hints_at_the_internal_one(
    server: tuple[RunningServer, str], key_file: Path
) -> None:
    running, _ = server
    result = cli("publish", "news", "1", "--port", str(running.port),
                 "--api-key-file", str(key_file))
    assert result.returncode == 1
    assert "404" in result.stderr and "--internal-port" in result.stderr


def test_publish_reads_only_what_it_needs_of_the_servers_configuration(
    server: tuple[RunningServer, str], member: SyncClient, key_file: Path
) -> None:
    # The server's own checks are not publish's: without a JWT key in its
    # environment, --host 0.0.0.0 (the server's "every address") is no demo-mode
    # error; nor is a setting publish does not read.
    _, internal = server
    port = internal.rsplit(":", 1)[1]
    result = cli("publish", "news", "4", "--host", "0.0.0.0", "--internal-port", port,
                 "--api-key-file", str(key_file), env={"WSSERVER_MAX_CONNECTIONS": "-1"})
    assert result.returncode == 0, result.stderr
    assert member.recv()["data"] == 4
