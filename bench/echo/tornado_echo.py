"""Plain Tornado echo: every message sent back as it came.

    python -m bench.echo.tornado_echo --port N
"""

from __future__ import annotations

import argparse
import asyncio

import tornado.web
import tornado.websocket


class Echo(tornado.websocket.WebSocketHandler):
    """Tornado's own WebSocket path, nothing added."""

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message, binary=isinstance(message, bytes))


async def serve(port: int) -> None:
    tornado.web.Application([(r"/.*", Echo)]).listen(port, address="127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))
