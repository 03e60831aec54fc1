"""A real ``redis-server`` for tests: started on a free loopback port, in its own dir.

Never the system service: every :class:`RedisServer` is a child process with
``--save ''`` and ``--appendonly no`` (a restart loses everything, as a
Redis without persistence does), stopped at the end. The broker tests and
the cluster integration tests (several wsserver processes sharing one Redis)
both use it::

    with RedisServer(tmp_path) as redis:
        run_server("--broker", redis.url, ...)
        redis.freeze(); ...; redis.thaw()
        redis.restart()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.support.servers import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
READY = "Ready to accept connections"
START_TIMEOUT = 10.0


def require_redis_server() -> None:
    """Skip the calling test when ``redis-server`` is not installed (scripts/test.sh installs it)."""
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


class RedisServer:
    """One ``redis-server`` child process; :meth:`restart` keeps its port."""

    def __init__(self, directory: Path, port: int | None = None, *,
                 extra: Sequence[str] = (), password: str | None = None) -> None:
        """``extra``: more ``redis-server`` arguments (they override the defaults);
        ``password``: what :meth:`command` authenticates with."""
        self.extra = list(extra)
        self.password = password
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server and wait for its "ready" log line."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self._cond:
            self._lines = []
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                "--daemonize", "no", "--logfile", "", "--loglevel", "notice",
                *self.extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        self._wait_ready()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with self._cond:
            while not any(READY in line for line in self._lines):
                remaining = deadline - time.monotonic()
                assert self.proc is not None
                if remaining <= 0 or self.proc.poll() is not None:
                    logs = "".join(self._lines)
                    self.stop()
                    raise AssertionError(f"redis-server did not start; logs:\n{logs}")
                self._cond.wait(remaining)

    def logs(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGTERM, or ``signal.SIGKILL``) and wait for it."""
        proc = self.proc
        if proc is None:
            return
        if self.frozen:
            self.thaw()
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: every key is gone (no persistence)."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def command(self, *args: str | int) -> Any:
        """Run one command on a fresh connection (``CLIENT KILL``, ``FLUSHALL``...)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5,
                             password=self.password)
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
