"""An application backend that answers the connect proxy at once, for ``connect_proxy``.

``python -m bench.proxy_backend --port N``: ``POST /connect`` reads the
request and answers ``{"result": {"user": "bench-<n>"}}``, a new user per
call (so the per-user cap never refuses); ``GET /healthz`` answers 200. The
least a real backend could do: what is measured is the round trip's price on
the wsserver side.
"""

from __future__ import annotations

import argparse
import itertools

from aiohttp import web

_users = itertools.count()


async def connect(request: web.Request) -> web.Response:
    await request.json()
    return web.json_response({"result": {"user": f"bench-{next(_users)}"}})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy_backend")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/connect", connect)
    app.router.add_get("/healthz", healthz)
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
