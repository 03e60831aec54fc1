"""Out of descriptors: accepting pauses with one warning, then recovers."""

from __future__ import annotations

import socket
from typing import Any

from tests.support.aio import run
from tests.support.clients import welcomed
from tests.support.tokens import KEYED_ENV, mint


def test_running_out_of_descriptors_pauses_accepting_then_recovers(run_server: Any) -> None:
    srv = run_server("--task-workers", "1", "--header-timeout", "30", env=KEYED_ENV, max_files=64)
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
    token = mint("after", ttl=60)

    async def connect() -> dict[str, Any]:
        ws = await welcomed(srv, token)
        assert ws.welcome is not None
        await ws.close()
        return ws.welcome

    assert run(connect)["user"] == "after"
    logs = srv.logs()
    # One line an operator can act on, not a traceback per loop turn.
    assert logs.count("cannot accept connections") == 1, logs[-2000:]
    assert "Traceback" not in logs
    assert "raise the open file limit" in logs
