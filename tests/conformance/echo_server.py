"""A raw echo server on wsserver's own frame layer, for Autobahn|TestSuite and benchmarks.

Tornado answers the HTTP upgrade (over TLS with ``--certfile``/``--keyfile``),
``wsserver.edge.fastpath`` carries the frames after it, and a trivial receiver
sends every text and binary message back, compressed when the client offered
permessage-deflate. Nothing else: no token, no JSON, no limits beyond the
frame layer's own (set high here, since the suite sends 16 MiB messages and
64-byte fragments by the thousand).

    python -m tests.conformance.echo_server --port N [--certfile F --keyfile F] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl

import tornado.web

from wsserver.edge.fastpath import FrameConnection, FrameLimits, UpgradeHandler

#: Limits for the suite: messages up to 16 MiB, fragments without a budget.
LIMITS = FrameLimits(
    max_message_size=16 * 1024 * 1024, frame_rate=None, fragment_timeout=30.0
)


class EchoReceiver:
    """Sends each message back as it came."""

    __slots__ = ("transport",)

    def __init__(self, transport: FrameConnection) -> None:
        self.transport = transport

    def on_text(self, text: str) -> None:
        self.transport.send_data(text.encode("utf-8"))

    def on_binary(self, data: bytes) -> None:
        self.transport.send_data(data, binary=True)

    def on_pong(self, data: bytes) -> None:
        pass

    def on_closed(self, code: int, reason: str, by_server: bool) -> None:
        pass


class EchoHandler(UpgradeHandler):
    """The upgrade, then the frame layer."""

    limits = LIMITS

    def open(self, connection: FrameConnection) -> None:
        connection.receiver = EchoReceiver(connection)


def make_app(limits: FrameLimits = LIMITS) -> tornado.web.Application:
    """The echo application (``limits`` for tests that want smaller ones)."""
    handler = type("LimitedEchoHandler", (EchoHandler,), {"limits": limits})
    return tornado.web.Application([(r"/.*", handler)])


async def serve(port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
    """Serve until SIGINT or SIGTERM."""
    server = make_app().listen(port, address=host, ssl_options=tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo server on {'wss' if tls else 'ws'}://{host}:{port}/", flush=True)
    await stop.wait()
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (if installed)")
    parser.add_argument("--certfile", help="serve wss:// with this certificate (and --keyfile)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    args = parser.parse_args()
    tls = None
    if args.certfile:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.certfile, args.keyfile)
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.port, args.host, tls))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.port, args.host, tls))


if __name__ == "__main__":
    main()
