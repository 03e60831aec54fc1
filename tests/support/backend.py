"""A small application's backend, served for real: cookie sessions, the four proxies, a JWKS.

:class:`AppBackend` is an aiohttp application on a free loopback port, in a
thread with its own event loop (so a backend that hangs never holds the
server's loop, and the server reaches it over real sockets as it would a
Django or FastAPI app). It answers the way the contract says an application
would:

* ``POST /login`` ``{"user": U}`` sets a ``session`` cookie (the app's own
  session, opaque to wsserver);
* ``POST /proxy/connect`` reads that cookie (or ``Authorization: Bearer
  <session>``) from the headers wsserver passed on: a known session is
  ``{"result": {"user": U, ...}}``, anything else ``{"disconnect": ...}``;
* ``POST /proxy/subscribe``: ``team:<name>`` rooms are for the users in
  :attr:`AppBackend.teams`; ``/proxy/publish`` masks the word "darn" and
  refuses ``"spam"``; ``/proxy/rpc`` has ``whoami``, ``add`` and ``fail``;
* ``GET /jwks``: :attr:`AppBackend.jwks`, counted in :attr:`AppBackend.jwks_requests`.

Tests change its answers per kind with :meth:`AppBackend.fault` (``"500"``,
``"garbage"``, ``"not_json"``, ``"hang"``, a delay) or :attr:`AppBackend.answers`
(a function per kind), and read every call it received in
:attr:`AppBackend.calls`.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.waiting import poll

Answer = Callable[[dict[str, Any]], Any]


@dataclass
class Call:
    """One proxy call as the backend received it."""

    kind: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class AppBackend:
    """The backend application; :meth:`start` serves it, :meth:`stop` ends it."""

    #: session cookie value → user.
    sessions: dict[str, str] = field(default_factory=dict)
    #: ``team:<name>`` → the users who may join it (the subscribe proxy's rule).
    teams: dict[str, set[str]] = field(default_factory=dict)
    #: Seconds of life the connect proxy gives a session (None: no expires_at).
    session_ttl: float | None = 600.0
    #: Grants the connect proxy adds to its result (``rooms``, ``publish``).
    grants: dict[str, Any] = field(default_factory=dict)
    #: Per kind, a function of the request body giving the answer (JSON-able).
    answers: dict[str, Answer] = field(default_factory=dict)
    #: The JWKS document served at /jwks.
    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    jwks_requests: int = 0
    calls: list[Call] = field(default_factory=list)
    #: Calls in progress right now, by kind (a hanging backend's pile).
    waiting: dict[str, int] = field(default_factory=dict)
    _faults: dict[str, str | float] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None
    _release: asyncio.Event | None = None
    port: int = 0

    # --- what tests use --------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def proxy_flags(self, *kinds: str) -> dict[str, str]:
        """``server_flags`` for the proxies of ``kinds`` (all four when none given)."""
        return {f"proxy_{kind}_url": f"{self.url}/proxy/{kind}"
                for kind in kinds or ("connect", "subscribe", "publish", "rpc")}

    def proxy_args(self, *kinds: str) -> list[str]:
        """The same as command-line flags, for a server process."""
        args: list[str] = []
        for name, value in self.proxy_flags(*kinds).items():
            args += ["--" + name.replace("_", "-"), value]
        return args

    def login(self, user: str) -> str:
        """A session for ``user``: the ``Cookie`` header value a browser would send."""
        value = secrets.token_urlsafe(16)
        self.sessions[value] = user
        return f"theme=dark; session={value}"

    def fault(self, kind: str, how: str | float | None) -> None:
        """Make ``kind`` answer 500, garbage, not JSON, hang, or after ``how`` seconds;
        None restores it."""
        if how is None:
            self._faults.pop(kind, None)
        else:
            self._faults[kind] = how

    def calls_of(self, kind: str) -> list[Call]:
        return [call for call in self.calls if call.kind == kind]

    def release_hanging(self) -> None:
        """Let every hanging call end (it then answers 500)."""
        loop, release = self._loop, self._release
        if loop is not None and release is not None:
            loop.call_soon_threadsafe(release.set)

    # --- serving ---------------------------------------------------------------

    def start(self) -> AppBackend:
        ready = threading.Event()

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._serve())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="app-backend", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise AssertionError("the backend did not start in 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self.release_hanging()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    async def _serve(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/login", self._login)
        app.router.add_get("/jwks", self._jwks)
        for kind in ("connect", "subscribe", "publish", "rpc"):
            app.router.add_post(f"/proxy/{kind}", self._proxy(kind))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _login(self, request: web.Request) -> web.Response:
        body = await request.json()
        value = secrets.token_urlsafe(16)
        self.sessions[value] = body["user"]
        response = web.json_response({"user": body["user"]})
        response.set_cookie("session", value, httponly=True)
        return response

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_requests += 1
        fault = self._faults.get("jwks")
        if fault == "500":
            return web.Response(status=500, text="down")
        return web.json_response(self.jwks)

    def _proxy(self, kind: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            body = await request.json()
            self.calls.append(Call(kind, body, dict(request.headers)))
            fault = self._faults.get(kind)
            if fault == "hang" or isinstance(fault, float | int):
                self.waiting[kind] = self.waiting.get(kind, 0) + 1
                try:
                    assert self._release is not None
                    timeout = 3600.0 if fault == "hang" else float(fault)
                    try:
                        await asyncio.wait_for(self._release.wait(), timeout)
                        return web.Response(status=500, text="released")
                    except TimeoutError:
                        pass  # a slow answer: the normal one, late
                finally:
                    self.waiting[kind] -= 1
            elif fault == "500":
                return web.Response(status=500, text="Internal Server Error")
            elif fault == "garbage":
                return web.json_response({"something": "else"})
            elif fault == "not_json":
                return web.Response(text="<html>oops</html>", content_type="text/html")
            answer = self.answers.get(kind) or getattr(self, f"_answer_{kind}")
            return web.json_response(answer(body))

        return handle

    # --- the application's rules -------------------------------------------------

    def _session_user(self, headers: dict[str, str]) -> str | None:
        cookie = headers.get("Cookie", "")
        for part in cookie.split(";"):
            name, _, value = part.strip().partition("=")
            if name == "session" and value in self.sessions:
                return self.sessions[value]
        scheme, _, value = headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value in self.sessions:
            return self.sessions[value]
        return None

    def _answer_connect(self, body: dict[str, Any]) -> Any:
        user = self._session_user(body.get("headers", {}))
        if user is None:
            return {"disconnect": {"code": 4003, "reason": "not logged in"}}
        result: dict[str, Any] = {"user": user, **self.grants}
        if self.session_ttl is not None:
            result["expires_at"] = int(time.time() + self.session_ttl)
        return {"result": result}

    def _answer_subscribe(self, body: dict[str, Any]) -> Any:
        if body["user"] in self.teams.get(body["room"], set()):
            return {"result": {}}
        return {"error": {"code": "forbidden", "message": f"{body['user']} is not in that team"}}

    def _answer_publish(self, body: dict[str, Any]) -> Any:
        data = body["data"]
        if data == "spam":
            return {"error": {"code": "forbidden", "message": "no spam here"}}
        if isinstance(data, str) and "darn" in data:
            return {"result": {"data": data.replace("darn", "d**n")}}
        return {"result": {}}

    def _answer_rpc(self, body: dict[str, Any]) -> Any:
        method, data = body["method"], body.get("data")
        if method == "whoami":
            return {"result": {"data": {"user": body["user"]}}}
        if method == "add":
            return {"result": {"data": sum(data)}}
        if method == "fail":
            return {"error": {"code": "not_found", "message": "no such order"}}
        return {"error": {"code": "bad_request", "message": f"unknown method {method!r}"}}


@contextmanager
def running_backend() -> Iterator[AppBackend]:
    """An :class:`AppBackend` served for the ``with`` block."""
    backend = AppBackend().start()
    try:
        yield backend
    finally:
        backend.stop()


def wait_for_waiting(backend: AppBackend, kind: str, count: int) -> None:
    """Until ``count`` calls of ``kind`` hang at the backend."""
    poll(lambda: backend.waiting.get(kind, 0) >= count, f"{count} {kind} calls waiting")
