"""Fixtures shared by the integration and end-to-end tests.

``run_server`` starts the real ``python -m wsserver`` in a subprocess on a
free port (``--port 0``; the port is read from its "listening on" log line),
waits until ``/healthz`` answers, and stops it with SIGTERM at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tornado.ioloop import IOLoop

if TYPE_CHECKING:
    from tests.cluster_support import Clients
    from tests.redis_support import RedisServer

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-0123456789-abcdefghijklmnop"
LISTENING = re.compile(r"listening on (https?)://(\S+):(\d+)/")
START_TIMEOUT = 20.0


class RunningServer:
    """A ``python -m wsserver`` subprocess and what the tests need of it."""

    def __init__(self, args: list[str], env: dict[str, str], max_files: int | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsserver", *args],
            cwd=ROOT,
            env=env,
            # Soft and hard: the server raises its soft limit to the hard one.
            preexec_fn=None if max_files is None else _limit_files(max_files),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            match = self.wait_for_log(LISTENING, START_TIMEOUT)
        except AssertionError:
            self.proc.kill()
            self.proc.wait()
            self._release()
            raise
        self.scheme = match.group(1)
        self.host = match.group(2).strip("[]")
        self.port = int(match.group(3))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.scheme == 'https' else 'ws'}://127.0.0.1:{self.port}/ws"

    def logs(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """Block until a log line matches ``pattern``; the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    found = regex.search(line)
                    if found:
                        return found
                seen = len(self._lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no log line matched {regex.pattern!r}; logs:\n{''.join(self._lines)}"
                    )
                self._cond.wait(remaining)

    def get_json(self, path: str, method: str = "GET", body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def demo_token(self, user: str) -> str:
        token: str = self.get_json("/auth/demo-token", "POST", {"user": user})["token"]
        return token

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return str(response.read().decode())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._release()
        return code

    def _release(self) -> None:
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _limit_files(count: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))

    return limit


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` of the test's own on a free loopback port
    (never the system service), stopped at the end."""
    from tests.redis_support import RedisServer, require_redis_server

    require_redis_server()
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def clients() -> Iterator[Clients]:
    """Synchronous WebSocket clients (``tests.cluster_support``), all closed at the end."""
    # Imported here: tests.cluster_support imports this module.
    from tests.cluster_support import clients_fixture

    yield from clients_fixture()


@pytest.fixture
def run_server() -> Iterator[Callable[..., RunningServer]]:
    """Factory: ``run_server(*args, env=None, max_files=None)`` → a started :class:`RunningServer`.

    ``env`` is added to a clean copy of the environment without any
    ``WSSERVER_*`` variables of the caller's.
    """
    started: list[RunningServer] = []

    def start(
        *args: str, env: dict[str, str] | None = None, max_files: int | None = None
    ) -> RunningServer:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("WSSERVER_")}
        full_env.update(env or {})
        if "--port" not in args:
            args = ("--port", "0", *args)
        server = RunningServer(list(args), full_env, max_files)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        server._release()


@pytest.fixture
def io_loop() -> Iterator[IOLoop]:
    """pytest-tornado's per-test loop, without its leak.

    pytest-tornado builds ``IOLoop()``, which makes itself current by first
    calling ``asyncio.get_event_loop()``; in a thread where no loop was ever
    set, that call *creates* a loop that nobody closes. Tornado restores it as
    the current loop at the end, and the next ``asyncio.run()`` drops it, so
    whichever test happens to run a garbage collection next failed with
    "unclosed event loop" (``filterwarnings = error``). Here the loop is built
    without that lookup and closed at the end, and no other loop is created.
    """
    loop = IOLoop(make_current=False)
    asyncio.set_event_loop(loop.asyncio_loop)  # type: ignore[attr-defined]
    try:
        yield loop
    finally:
        asyncio.set_event_loop(None)
        loop.close(all_fds=True)
