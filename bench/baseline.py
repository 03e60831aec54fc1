"""A plain-Tornado WebSocket server: the baseline wsserver is measured against.

It speaks the same JSON protocol as wsserver (``ping``, ``echo``, ``join``,
``publish``, ``task``) the way a first Tornado app would: no authentication,
no limits, ``json.loads`` in a synchronous ``on_message``, one
``write_message(dict)`` per recipient when publishing (the "naive loop"), and
tasks computed inline on the event loop (the very functions wsserver runs in
its process pool, imported from ``wsserver.tasks``). It sends a ``welcome`` on
open so a client knows the connection is ready, as wsserver does.

Run it with ``python -m bench.baseline --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Callable
from typing import Any

import tornado.web
import tornado.websocket

from wsserver.tasks import count_primes, iterated_sha256

Rooms = dict[str, set["BaselineSocket"]]


#: The same task functions wsserver runs in its pool, called here on the loop.
TASKS: dict[str, Callable[..., Any]] = {"primes": count_primes, "sha256": iterated_sha256}


class BaselineSocket(tornado.websocket.WebSocketHandler):
    """The WebSocket endpoint, written as a plain Tornado app would be."""

    def initialize(self, rooms: Rooms) -> None:
        self.rooms = rooms
        self.joined: set[str] = set()

    def check_origin(self, origin: str) -> bool:
        # The baseline has no origin policy; wsserver's clients send no Origin either.
        return True

    def open(self, *args: str, **kwargs: str) -> None:
        self.write_message({"type": "welcome", "user": "anonymous"})

    def on_message(self, message: str | bytes) -> None:
        msg = json.loads(message)
        kind = msg.get("type")
        reply: dict[str, Any]
        if kind == "ping":
            reply = {"type": "pong"}
        elif kind == "echo":
            reply = {"type": "echo", "data": msg.get("data")}
        elif kind == "join":
            room = msg["room"]
            self.rooms.setdefault(room, set()).add(self)
            self.joined.add(room)
            reply = {"type": "joined", "room": room}
        elif kind == "publish":
            room = msg["room"]
            out = {"type": "message", "room": room, "from": "anonymous", "data": msg.get("data")}
            for member in self.rooms.get(room, ()):
                member.write_message(out)
            return
        elif kind == "task":
            # Inline on the loop: every other connection waits while this runs.
            value = TASKS[msg["name"]](**msg["args"])
            reply = {"type": "result", "name": msg["name"], "value": value}
        else:
            reply = {"type": "error", "code": "unknown_type", "message": str(kind)}
        if "id" in msg:
            reply["id"] = msg["id"]
        self.write_message(reply)

    def on_close(self) -> None:
        for room in self.joined:
            members = self.rooms.get(room)
            if members is not None:
                members.discard(self)
                if not members:
                    del self.rooms[room]


class HealthHandler(tornado.web.RequestHandler):
    """``GET /healthz`` so the benchmark can wait for start-up as it does for wsserver."""

    def get(self) -> None:
        self.write({"status": "ok"})


def make_app() -> tornado.web.Application:
    """The baseline application: ``/ws`` and ``/healthz``."""
    rooms: Rooms = {}
    return tornado.web.Application(
        [(r"/ws", BaselineSocket, {"rooms": rooms}), (r"/healthz", HealthHandler)]
    )


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = make_app().listen(port, host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true",
                        help="run Tornado on uvloop instead of asyncio's own loop (an experiment)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    else:
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
