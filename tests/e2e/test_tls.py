"""``--certfile``/``--keyfile``: the server speaks wss:// itself, with a certificate made here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import REPO, TEST_SECRET, write_self_signed_cert
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage
from websockets.typing import Origin

pytestmark = pytest.mark.e2e

SERVER_ENV = {"WSSERVER_JWT_SECRET": TEST_SECRET}


@pytest.fixture
def tls_server(run_server: Any, tmp_path: Path) -> tuple[Any, ssl.SSLContext]:
    """A server on wss:// and a client context that trusts only its certificate."""
    cert, key = write_self_signed_cert(tmp_path)
    server = run_server(
        "--port", "0", "--certfile", str(cert), "--keyfile", str(key),
        "--allowed-origins", "https://127.0.0.1",
        env=SERVER_ENV,
    )
    context = ssl.create_default_context(cafile=str(cert))
    return server, context


def cli_token(sub: str) -> str:
    """A token from ``python -m wsserver token`` with the server's key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSSERVER_")}
    env.update(SERVER_ENV)
    result = subprocess.run(
        [sys.executable, "-m", "wsserver", "token", sub, "--ttl", "300"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30, check=True,
    )
    return result.stdout.strip()


def test_wss_welcome_with_the_generated_certificate(tls_server: tuple[Any, ssl.SSLContext]) -> None:
    server, context = tls_server
    url = f"wss://127.0.0.1:{server.port}/ws"
    token = cli_token("alice")

    async def scenario() -> dict[str, Any]:
        async with connect(
            url, ssl=context, additional_headers={"Authorization": f"Bearer {token}"},
            origin=Origin("https://127.0.0.1"), open_timeout=10,
        ) as ws:
            message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
            return message

    message = asyncio.run(scenario())
    assert message["type"] == "welcome"
    assert message["user"] == "alice"
    # Plain HTTPS answers too, with the same certificate.
    with urllib.request.urlopen(
        f"https://127.0.0.1:{server.port}/healthz", context=context, timeout=10
    ) as response:
        assert response.status == 200


def test_certificate_is_really_checked(tls_server: tuple[Any, ssl.SSLContext]) -> None:
    # A client trusting only the system CAs refuses the self-signed
    # certificate: the context above trusts it because it was given it.
    server, _ = tls_server

    async def scenario() -> None:
        async with connect(
            f"wss://127.0.0.1:{server.port}/ws", ssl=ssl.create_default_context(),
            open_timeout=10,
        ):
            pass

    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(scenario())


def test_plain_ws_to_the_tls_port_fails(tls_server: tuple[Any, ssl.SSLContext]) -> None:
    server, context = tls_server

    async def scenario() -> None:
        async with connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=10):
            pass

    # The TLS server drops a plaintext handshake: no HTTP answer ever comes.
    with pytest.raises((InvalidMessage, ConnectionError)):
        asyncio.run(scenario())
    # ...and goes on serving TLS clients.
    with urllib.request.urlopen(
        f"https://127.0.0.1:{server.port}/healthz", context=context, timeout=10
    ) as response:
        assert response.status == 200


def test_wss_refused_token_is_cut_once_its_close_frame_is_out(
    tls_server: tuple[Any, ssl.SSLContext],
) -> None:
    """A garbage token on the TLS path: 4001, then the server drops TCP itself at
    once, without waiting for a close answer that this client never sends."""
    server, context = tls_server

    async def scenario() -> tuple[bytes, float]:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=context, server_hostname="127.0.0.1"
        )
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer not.a.jwt\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        started = loop.time()
        rest = await asyncio.wait_for(reader.read(), 10)  # until the server's EOF
        elapsed = loop.time() - started
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return rest, elapsed

    rest, elapsed = asyncio.run(scenario())
    # One close frame (opcode 8) carrying 4001, then the end of the stream.
    assert rest[0] == 0x88 and int.from_bytes(rest[2:4], "big") == 4001, rest
    assert elapsed < 1.0, elapsed
