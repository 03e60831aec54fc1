"""Real processes for the tests: ``python -m wsserver``, its command line, free ports.

:class:`RunningServer` starts the server in a subprocess (``--port 0`` unless
a port is given; the port is read from its "listening on" log line) and
collects its log lines, so a test waits for a line instead of sleeping.
The ``run_server`` fixture (``tests/conftest.py``) starts them and stops
every one at the end.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: The repository root: the working directory of every server and command.
ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening on (https?)://(\S+):(\d+)/")
START_TIMEOUT = 20.0
#: A handshake bucket wide enough that tests about other limits never hit it.
NO_HANDSHAKE_LIMIT = ("--handshake-rate", "1000", "--handshake-burst", "1000")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Return once ``port`` accepts connections; fail if ``process`` exits first.

    For processes with no readiness signal of their own (nginx): polled.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def clean_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any ``WSSERVER_*`` variable, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WSSERVER_")}
    clean.update(env or {})
    return clean


def run_cli(*args: str, env: Mapping[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m wsserver ARGS`` to completion in a clean environment plus ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "wsserver", *args], cwd=ROOT, env=clean_env(env),
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


class RunningServer:
    """A ``python -m wsserver`` subprocess and what the tests need of it.

    Args:
        args: the command line after ``python -m wsserver``.
        env: the whole environment of the process.
        max_files: RLIMIT_NOFILE for it (soft and hard).
        launcher: a command put in front (a sandbox, as systemd's would be).
        wait: wait for the "listening on" line (else ``args`` must name the port).
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str], max_files: int | None = None,
                 launcher: Sequence[str] = (), wait: bool = True) -> None:
        self.args = list(args)
        self.proc = subprocess.Popen(
            [*launcher, sys.executable, "-m", "wsserver", *self.args],
            cwd=ROOT,
            env=dict(env),
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
        self.scheme, self.host = "http", "127.0.0.1"
        if not wait:
            self.port = int(self.args[self.args.index("--port") + 1])
            return
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

    def ensure_stopped(self) -> None:
        """SIGTERM (SIGKILL after 30 s) unless already gone; what fixtures end with."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._release()

    def _release(self) -> None:
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _limit_files(count: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))

    return limit


class ServerFactory:
    """``start(*args, env=None, ...)`` → a started :class:`RunningServer`; ``stop_all()``.

    ``env`` is added to :func:`clean_env`; ``--port 0`` is added unless the
    arguments name a port.
    """

    def __init__(self) -> None:
        self.started: list[RunningServer] = []

    def __call__(self, *args: str, env: Mapping[str, str] | None = None,
                 max_files: int | None = None, launcher: Sequence[str] = (),
                 wait: bool = True) -> RunningServer:
        if "--port" not in args:
            args = ("--port", "0", *args)
        server = RunningServer(args, clean_env(env), max_files, launcher, wait)
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.ensure_stopped()
