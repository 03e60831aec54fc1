"""A raw echo server on wsserver's own frame layer, for Autobahn|TestSuite and benchmarks.

Tornado answers the HTTP upgrade, ``wsserver.edge.fastpath`` carries the frames after
it, and a trivial receiver sends every text and binary message back. Nothing
else: no token, no JSON, no limits beyond the frame layer's own (set high here,
since the suite sends 16 MiB messages and 64-byte fragments by the thousand).

    python -m tests.conformance.echo_server --port N [--uvloop] [--certfile F --keyfile F]

With a certificate it serves ``wss://``, on whatever protocol the server itself
uses for TLS connections (``fastpath.protocol_for``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl

import tornado.web
import tornado.websocket

from wsserver import framing
from wsserver.edge.fastpath import FastProtocol, FrameConnection, FrameLimits, protocol_for

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
        self.transport.send_frame(framing.text_frame(text))

    def on_binary(self, data: bytes) -> None:
        self.transport.send_frame(framing.binary_frame(data))

    def on_pong(self, data: bytes) -> None:
        pass

    def on_closed(self, code: int, reason: str, by_server: bool) -> None:
        pass


class EchoHandler(tornado.websocket.WebSocketHandler):
    """The upgrade, then the fast path."""

    limits = LIMITS

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        return protocol_for(self, self.limits)

    def open(self, *args: str, **kwargs: str) -> None:
        protocol = self.ws_connection
        if isinstance(protocol, FastProtocol):
            assert protocol.transport is not None
            protocol.transport.receiver = EchoReceiver(protocol.transport)

    def on_message(self, message: str | bytes) -> None:
        """Tornado's own protocol (TLS) delivers messages here."""
        self.write_message(message, binary=isinstance(message, bytes))


def make_app(limits: FrameLimits = LIMITS) -> tornado.web.Application:
    """The echo application (``limits`` for tests that want smaller ones)."""
    handler = type("LimitedEchoHandler", (EchoHandler,), {"limits": limits})
    return tornado.web.Application(
        [(r"/.*", handler)], websocket_max_message_size=limits.max_message_size
    )


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
    parser.add_argument("--keyfile")
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
