"""Out of descriptors: accepting pauses with one warning, then recovers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import jwt
import websockets

from tests.support.tokens import SECRET

KEYED = {"WSSERVER_JWT_SECRET": SECRET}


def test_running_out_of_descriptors_pauses_accepting_then_recovers(run_server: Any) -> None:
    srv = run_server("--task-workers", "1", "--header-timeout", "30", env=KEYED, max_files=64)
    hogs: list[socket.socket] = []
    try:
        # Clients that never finish their request, more than the table holds.
        for _ in range(90):
            hog = socket.create_connection(("127.0.0.1", srv.port))
            hog.sendall(b"GET /healthz HTTP/1.1\r\n")
            hogs.append(hog)
        srv.wait_for_log("cannot accept connections: Too many open files")
    finally:
        for hog in hogs:
            hog.close()
    token = jwt.encode({"sub": "after", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")

    async def connect() -> dict[str, Any]:
        async with websockets.connect(
            srv.ws_url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
        ) as ws:
            welcome: dict[str, Any] = json.loads(await ws.recv())
            return welcome

    assert asyncio.run(connect())["user"] == "after"
    logs = srv.logs()
    # One line an operator can act on, not a traceback per loop turn.
    assert logs.count("cannot accept connections") == 1, logs[-2000:]
    assert "Traceback" not in logs
    assert "raise the open file limit" in logs
