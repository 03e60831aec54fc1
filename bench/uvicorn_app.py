"""The stretch comparison: the same echo protocol on FastAPI under ``uvicorn[standard]``.

Only ``ping`` and ``echo`` are served; it takes part in the echo scenario
alone. Run it with ``python -m bench.uvicorn_app --port N`` (uvloop, httptools
and the ``websockets`` implementation, as ``uvicorn[standard]`` picks them).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Lets the benchmark wait for start-up as it does for the other servers."""
    return {"status": "ok"}


@app.websocket("/ws")
async def ws(socket: WebSocket) -> None:
    """One connection: welcome, then answer ping and echo."""
    await socket.accept()
    await socket.send_text(json.dumps({"type": "welcome", "user": "anonymous"}))
    try:
        while True:
            msg = json.loads(await socket.receive_text())
            reply: dict[str, Any]
            if msg.get("type") == "ping":
                reply = {"type": "pong"}
            elif msg.get("type") == "echo":
                reply = {"type": "echo", "data": msg.get("data")}
            else:
                reply = {"type": "error", "code": "unknown_type", "message": "not served here"}
            if "id" in msg:
                reply["id"] = msg["id"]
            await socket.send_text(json.dumps(reply))
    except WebSocketDisconnect:
        pass


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws_ping_interval=None)


if __name__ == "__main__":
    main()
