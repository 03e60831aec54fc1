"""The command line as a user runs it: exit codes, messages, tokens."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.support.clients import welcomed_sync
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
        ("--ws-ping-timeout=30", "--ping-interval"),
        ("--timeout-keep-alive", "--header-timeout"),
        ("--timeout-graceful-shutdown", "--drain-timeout"),
        ("--backlog", "fixed at 1024"),
        ("--limit-max-requests", "nothing grows per request"),
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


def test_genconfig_prints_a_file_check_config_accepts(tmp_path: Path) -> None:
    printed = run("genconfig")
    assert printed.returncode == 0, printed.stderr
    assert "#max-connections = 1000" in printed.stdout
    assert "#[rooms.namespaces.user]" in printed.stdout
    config = tmp_path / "wsserver.toml"
    config.write_text(printed.stdout)
    checked = run("check-config", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    # As printed it configures nothing: the same summary as no file at all.
    assert checked.stdout == run("check-config").stdout


@pytest.mark.parametrize(
    ("word", "guess"), [("tokne", "token"), ("chek-config", "check-config"), ("genconf", "genconfig")]
)
def test_a_mistyped_command_is_named_with_a_guess(word: str, guess: str) -> None:
    result = run(word)
    assert result.returncode == 2
    assert f"unknown command '{word}'; did you mean '{guess}'?" in result.stderr
    assert "unrecognized arguments" not in result.stderr
    assert "not a loopback" not in result.stderr


def test_an_asgi_app_argument_is_explained() -> None:
    result = run("main:app", "--port", "8000")
    assert result.returncode == 2
    assert "unknown command 'main:app'" in result.stderr and "no APP argument" in result.stderr


def test_usage_names_the_command_as_it_was_run() -> None:
    module = run("--help")
    assert module.stdout.startswith("usage: python -m wsserver ")
    script = Path(sys.executable).with_name("wsserver")
    installed = subprocess.run([str(script), "publish", "--help"], capture_output=True,
                               text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert installed.stdout.startswith("usage: wsserver publish ")
    unknown = subprocess.run([str(script), "tokne"], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    assert unknown.stderr.startswith("wsserver: unknown command 'tokne'")


def test_publish_help_lists_only_what_publish_reads() -> None:
    result = run("publish", "--help")
    assert result.returncode == 0
    for flag in ("--url", "--api-key-file", "--host", "--port", "--internal-port", "--config"):
        assert flag in result.stdout
    for flag in ("--max-connections", "--jwt-secret-file", "--allowed-origins", "--workers",
                 "--log-format"):
        assert flag not in result.stdout
    assert "the server's address" in " ".join(result.stdout.split())
    assert "listen address" not in result.stdout


def test_token_never_outlives_max_token_lifetime(run_server: Any) -> None:
    env = {**KEYED_ENV, "WSSERVER_MAX_TOKEN_LIFETIME": "600"}
    refused = run("token", "alice", "--ttl", "3600", env=env)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "--max-token-lifetime 600" in refused.stderr and "--ttl 600" in refused.stderr
    minted = run("token", "alice", env=env)  # the default, 3600, is capped
    assert minted.returncode == 0, minted.stderr
    claims = jwt.decode(minted.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 600
    # And a server with the same setting takes it.
    srv = run_server("--max-token-lifetime", "600", env=KEYED_ENV)
    client = welcomed_sync(srv, minted.stdout.strip())
    assert client.user == "alice"
    client.close()
