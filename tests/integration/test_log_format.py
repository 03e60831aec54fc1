"""--log-format json: every line a real server writes during a session is one JSON object."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from tests.support.clients import welcomed_sync
from tests.support.http import fetch
from wsserver.logsafe import escape

#: A user name a log line must carry intact: quotes, a backslash, non-ASCII.
USER = 'Zoë "q" \\ 😀'


def test_every_line_of_a_session_is_one_json_object(run_server: Callable[..., Any]) -> None:
    srv = run_server("--log-format", "json")
    origin = srv.url
    token = srv.demo_token(USER)
    client = welcomed_sync(srv, token, origin=origin)
    client.join("lobby")
    client.ask({"type": "publish", "room": "lobby", "data": "hi"}, skip=("joined",))
    client.close()
    srv.wait_for_log(r'"msg": "close user=')
    # A refused handshake, an access line with a query token, a malformed request.
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Origin": "https://evil.example"}
    assert fetch(srv.url + "/ws", headers=upgrade).status == 403
    assert fetch(srv.url + "/nowhere?token=SECRET-QUERY").status == 404
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"GET /ws?token=SECRET-QUERY HTTP/1.1\r\nX: Bearer SECRET\x01\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    srv.wait_for_log(r"malformed request refused")
    assert srv.stop() == 0

    logs = srv.logs()
    assert token not in logs and "SECRET" not in logs
    entries = [json.loads(line) for line in logs.splitlines()]
    assert len(entries) > 10
    for entry in entries:
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry
    by_msg = {entry["msg"].split(" ", 1)[0]: entry for entry in entries}
    opened, closed = by_msg["open"], by_msg["close"]
    # As the text line shows it: escaped (the backslash doubled), never raw.
    shown = escape(USER)
    assert (opened["user"], opened["addr"], opened["via"]) == (shown, "127.0.0.1", "header")
    assert (closed["user"], closed["code"], closed["by"]) == (shown, 1000, "client")
    assert isinstance(closed["duration"], float)
    refused = by_msg["handshake"]
    assert (refused["addr"], refused["status"], refused["reason"]) == ("127.0.0.1", 403, "origin")
    access = next(e for e in entries if e["logger"] == "wsserver.access" and e["status"] == 404)
    assert (access["status"], access["method"], access["uri"]) == (
        404, "GET", "/nowhere?token=[redacted]")
    assert by_msg["malformed"]["request"] == "GET /ws?token=[redacted] HTTP/1.1"
    assert entries[-1]["msg"] == "stopped"


def test_a_log_config_file_decides_the_output(run_server: Callable[..., Any], tmp_path: Any) -> None:
    out = tmp_path / "wsserver.log"
    config = tmp_path / "logging.json"
    config.write_text(json.dumps({
        "version": 1,
        "formatters": {"json": {"()": "wsserver.logconfig.JsonFormatter"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(out), "formatter": "json"},
            # The test reads the "listening on" line from stderr.
            "stderr": {"class": "logging.StreamHandler"},
        },
        "root": {"level": "INFO", "handlers": ["file", "stderr"]},
    }))
    srv = run_server("--log-config", str(config))
    fetch(srv.url + "/nowhere")
    srv.wait_for_log("404 GET /nowhere")
    assert srv.stop() == 0
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(e["logger"] == "wsserver.access" and e["status"] == 404 for e in entries)
    assert entries[-1]["msg"] == "stopped"


def test_a_broken_log_config_stops_the_start_with_exit_2(
    run_server: Callable[..., Any], tmp_path: Any
) -> None:
    config = tmp_path / "logging.ini"
    config.write_text("[loggers]\nkeys=root\n")
    srv = run_server("--port", "0", "--log-config", str(config), wait=False)
    assert srv.proc.wait(30) == 2
    assert f"--log-config {config}: not a logging fileConfig (INI)" in srv.logs()
