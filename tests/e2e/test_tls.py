"""``--certfile``/``--keyfile``: the server speaks wss:// itself, with a certificate made here."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidMessage

from tests.support.aio import run
from tests.support.clients import Message, connect
from tests.support.deploy import write_self_signed_cert
from tests.support.http import fetch
from tests.support.raw import upgrade_request
from tests.support.servers import run_cli
from tests.support.tokens import KEYED_ENV, bearer

pytestmark = pytest.mark.e2e

SERVER_ENV = KEYED_ENV


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
    result = run_cli("token", sub, "--ttl", "300", env=SERVER_ENV, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_wss_welcome_with_the_generated_certificate(tls_server: tuple[Any, ssl.SSLContext]) -> None:
    server, context = tls_server
    url = f"wss://127.0.0.1:{server.port}/ws"
    token = cli_token("alice")

    async def scenario() -> Message | None:
        ws = await connect(url, token, ssl=context, origin="https://127.0.0.1")
        message = await ws.recv()
        await ws.close()
        return message

    message = run(scenario)
    assert message is not None
    assert message["type"] == "welcome"
    assert message["user"] == "alice"
    # Plain HTTPS answers too, with the same certificate.
    assert fetch(f"https://127.0.0.1:{server.port}/healthz", context=context).status == 200


def test_certificate_is_really_checked(tls_server: tuple[Any, ssl.SSLContext]) -> None:
    # A client trusting only the system CAs refuses the self-signed
    # certificate: the context above trusts it because it was given it.
    server, _ = tls_server

    async def scenario() -> None:
        await connect(f"wss://127.0.0.1:{server.port}/ws", ssl=ssl.create_default_context())

    with pytest.raises(ssl.SSLCertVerificationError):
        run(scenario)


def test_plain_ws_to_the_tls_port_fails(tls_server: tuple[Any, ssl.SSLContext]) -> None:
    server, context = tls_server

    async def scenario() -> None:
        await connect(f"ws://127.0.0.1:{server.port}/ws")

    # The TLS server drops a plaintext handshake: no HTTP answer ever comes.
    with pytest.raises((InvalidMessage, ConnectionError)):
        run(scenario)
    # ...and goes on serving TLS clients.
    assert fetch(f"https://127.0.0.1:{server.port}/healthz", context=context).status == 200


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
        writer.write(upgrade_request(bearer("not.a.jwt")))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        started = loop.time()
        rest = await asyncio.wait_for(reader.read(), 10)  # until the server's EOF
        elapsed = loop.time() - started
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return rest, elapsed

    rest, elapsed = run(scenario)
    # One close frame (opcode 8) carrying 4001, then the end of the stream.
    assert rest[0] == 0x88 and int.from_bytes(rest[2:4], "big") == 4001, rest
    assert elapsed < 1.0, elapsed
