"""The command line as a user runs it: exit codes, messages, tokens."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from tests.support.servers import run_cli as run
from tests.support.tokens import KEYED_ENV, SECRET


def test_token_prints_a_verifiable_jwt() -> None:
    result = run("token", "alice", "--ttl", "120", env=KEYED_ENV)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert 100 < claims["exp"] - time.time() <= 121


def test_token_carries_configured_audience_and_issuer(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(SECRET)
    result = run("token", "bob", "--jwt-secret-file", str(key), "--jwt-audience", "chat",
                 "--jwt-issuer", "me")
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"], audience="chat",
                        issuer="me")
    assert claims["sub"] == "bob"


def test_token_without_a_key_explains_and_exits_2() -> None:
    result = run("token", "alice")
    assert result.returncode == 2
    assert "--jwt-secret-file" in result.stderr


def test_check_config_ok() -> None:
    result = run("check-config", env=KEYED_ENV)
    assert result.returncode == 0
    assert result.stdout.startswith("configuration OK")
    assert SECRET not in result.stdout + result.stderr


def test_check_config_lists_every_problem_one_line_each() -> None:
    result = run("check-config", "--port", "http", "--max-connections", "-1",
                 "--certfile", "/nonexistent", env={"WSSERVER_JWT_SECRET": "too-short-secret"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 4, lines
    assert all(line.startswith("wsserver: ") for line in lines)
    assert "too-short-secret" not in result.stderr


def test_check_config_tries_the_tasks_module() -> None:
    result = run("check-config", "--tasks-module", "no.such.module")
    assert result.returncode == 2
    assert "--tasks-module" in result.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_demo_mode_refuses_public_addresses(host: str) -> None:
    result = run("--host", host)
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr


def test_help_lists_every_option() -> None:
    result = run("serve", "--help")
    assert result.returncode == 0
    for flag in ("--jwt-secret-file", "--allowed-origins", "--max-connections-per-ip",
                 "--handshake-burst", "--task-timeout", "--trusted-proxies", "--demo-token-ttl"):
        assert flag in result.stdout
    assert run("--help").returncode == 0


def test_port_in_use_reports_the_bind_error_first_and_exits_2() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run("--port", str(taken.getsockname()[1]))
    assert result.returncode == 2
    assert "cannot serve" in result.stderr and "in use" in result.stderr
    # Nothing was serving: no shutdown story in front of the real error.
    assert "shutting down" not in result.stderr and "stopped" not in result.stderr


def test_check_config_summarises_the_room_policy(tmp_path: Path) -> None:
    config = tmp_path / "rooms.toml"
    config.write_text('[rooms.namespaces.user]\njoin = "owner"\npublish = "none"\n')
    result = run("check-config", "--config", str(config), env=KEYED_ENV)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1] == (
        "rooms (from the config file): default namespace join=token publish=token; "
        "user: join=owner publish=none"
    )
    demo = run("check-config")
    assert "rooms (demo mode): default namespace join=anyone publish=members" in demo.stdout


def test_check_config_rejects_a_bad_room_policy_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "rooms.toml"
    config.write_text('[rooms.namespaces.chat]\njoin = "everyone"\ncolour = "red"\n')
    result = run("check-config", "--config", str(config), env=KEYED_ENV)
    assert result.returncode == 2
    assert (
        f"wsserver: {config}: rooms.namespaces.chat.join: unknown value 'everyone' "
        "(use token, anyone, owner, proxy or none)"
    ) in result.stderr.splitlines()
    assert f"{config}: rooms.namespaces.chat.colour: unknown setting" in result.stderr
    assert result.stdout == ""


def test_token_mints_room_grants() -> None:
    result = run("token", "alice", "--rooms", "chat:*, user:alice", "--publish", "chat:news",
                 env=KEYED_ENV)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["rooms"] == ["chat:*", "user:alice"]
    assert claims["publish"] == ["chat:news"]
    bad = run("token", "alice", "--rooms", "chat:*:x", env=KEYED_ENV)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "'rooms' entry 0 has a '*' before its end" in bad.stderr


def test_token_help_lists_only_what_token_reads() -> None:
    result = run("token", "--help")
    assert result.returncode == 0
    for flag in ("--ttl", "--jwt-secret-file", "--jwt-audience", "--jwt-issuer", "--config"):
        assert flag in result.stdout
    for flag in ("--max-connections", "--host", "--allowed-origins", "--task-workers"):
        assert flag not in result.stdout


@pytest.mark.parametrize("sub", ["", "   ", "x" * 257])
def test_token_refuses_a_sub_the_server_would_refuse(sub: str) -> None:
    result = run("token", sub, env=KEYED_ENV)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "SUB" in result.stderr


@pytest.mark.parametrize(
    ("flag", "pointer"),
    [
        ("--reload", "restart"),
        ("--forwarded-allow-ips=127.0.0.1", "--trusted-proxies"),
        ("--ssl-certfile", "--certfile"),
    ],
)
def test_uvicorn_flags_point_to_the_mapping(flag: str, pointer: str) -> None:
    result = run(flag)
    assert result.returncode == 2
    assert "uvicorn flag" in result.stderr and pointer in result.stderr
    assert "docs/deploy.md" in result.stderr
    assert "unrecognized arguments" not in result.stderr


def test_no_access_log_is_a_wsserver_flag() -> None:
    result = run("check-config", "--no-access-log")
    assert result.returncode == 0, result.stderr


def test_check_config_accepts_a_sentinel_url_and_hides_its_password() -> None:
    url = "redis+sentinel://:hunter2@127.0.0.1:26379,127.0.0.1:26380/mymaster/0"
    result = run("check-config", "--broker", url, "--workers", "2", env=KEYED_ENV)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_check_config_refuses_a_sentinel_url_without_a_master() -> None:
    result = run("check-config", "--broker", "redis+sentinel://:hunter2@127.0.0.1:26379",
                 env=KEYED_ENV)
    assert result.returncode == 2
    assert "--broker" in result.stderr and "names the master" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
