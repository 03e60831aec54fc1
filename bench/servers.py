"""Start the servers under test as subprocesses, pinned, on free ports.

Each server runs in a process of its own, started through
:class:`ServerProcess`: affinity and the open-files limit are set in the child
before ``exec`` (so wsserver's task-pool workers, forked later, inherit the
same CPU set), ``/healthz`` is polled until it answers, and the process is
stopped with SIGTERM (SIGKILL for its whole process group if it hangs).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

#: The wsserver flags that lift its limits out of the benchmark's way. The
#: limits still run (the token buckets, the registry counts) so their cost
#: is measured; only their thresholds are raised.
WSSERVER_BENCH_FLAGS: tuple[str, ...] = (
    "--max-connections", "20000",
    "--max-connections-per-ip", "20000",
    "--max-connections-per-user", "20000",
    "--handshake-rate", "100000",
    "--handshake-burst", "100000",
    "--message-rate", "1000000000",
    "--message-burst", "1000000000",
    "--room-publish-rate", "1000000000",
    "--room-publish-burst", "1000000000",
    "--room-publish-bytes", "0",
    "--frame-rate", "1000000000",
    "--frame-burst", "1000000000",
)  # fmt: skip


@dataclass(frozen=True)
class ServerKind:
    """How to start one kind of server: its command (the port is appended) and its clients."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    #: Prefix of the JWT ``sub`` the clients present; None sends no token.
    jwt_user: str | None = None
    #: Served over TLS (``wss://``, ``https://`` for ``/healthz``) with a certificate
    #: that this CA file verifies (:mod:`bench.tlscert`); None: plain ``ws://``.
    cafile: str | None = None


def wsserver_kind(secret: str, extra_flags: Sequence[str] = ()) -> ServerKind:
    """wsserver with an HS256 key (not demo mode) and the benchmark's raised limits."""
    return ServerKind(
        "wsserver",
        (sys.executable, "-m", "wsserver", "--host", "127.0.0.1",
         *WSSERVER_BENCH_FLAGS, *extra_flags, "--port"),
        env={"WSSERVER_JWT_SECRET": secret},
        jwt_user="bench",
    )  # fmt: skip


def renamed(kind: ServerKind, name: str, extra_flags: Sequence[str] = ()) -> ServerKind:
    """``kind`` under another name (results and logs are keyed by it), with more flags.

    The flags go before the trailing ``--port`` that every kind's argv ends with.
    """
    argv = (*kind.argv[:-1], *extra_flags, kind.argv[-1])
    return dataclasses.replace(kind, name=name, argv=argv)


def baseline_kind() -> ServerKind:
    """The plain-Tornado baseline of :mod:`bench.baseline`."""
    return ServerKind("baseline", (sys.executable, "-m", "bench.baseline", "--port"))


def baseline_uvloop_kind() -> ServerKind:
    """The same baseline on uvloop: how much of the gap to uvicorn is the event loop."""
    return ServerKind(
        "baseline_uvloop", (sys.executable, "-m", "bench.baseline", "--uvloop", "--port")
    )


def uvicorn_kind() -> ServerKind:
    """FastAPI under uvicorn[standard], :mod:`bench.uvicorn_app`."""
    return ServerKind("uvicorn", (sys.executable, "-m", "bench.uvicorn_app", "--port"))


def proxy_backend_kind() -> ServerKind:
    """The connect-proxy backend of :mod:`bench.proxy_backend` (answers at once)."""
    return ServerKind("proxy_backend", (sys.executable, "-m", "bench.proxy_backend", "--port"))


NODE_WS_DIR = Path(__file__).resolve().parent / "node_ws"


def node_ws_kind() -> ServerKind:
    """Node.js with the ``ws`` package, :file:`bench/node_ws/server.js`: no authentication."""
    node = shutil.which("node") or "node"
    return ServerKind("node_ws", (node, str(NODE_WS_DIR / "server.js"), "--host", "127.0.0.1",
                                  "--port"))  # fmt: skip


def node_ws_available() -> str | None:
    """None when the Node ``ws`` baseline can run, else why not.

    Installs ``ws`` with ``npm ci --prefix bench/node_ws`` (from the committed
    lock file, into the git-ignored ``node_modules``) unless the installed
    copy is already the locked one.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node and npm are not both on PATH (apt-get install nodejs npm)"
    marker = NODE_WS_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_WS_DIR / "package-lock.json"
    if marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime:
        return None
    try:
        proc = subprocess.run(
            [npm, "ci", "--prefix", str(NODE_WS_DIR), "--no-audit", "--no-fund",
             "--loglevel", "error"],
            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"npm ci --prefix bench/node_ws failed: {exc}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return f"npm ci --prefix bench/node_ws exited {proc.returncode}: {' / '.join(tail)}"
    return None


def new_secret() -> str:
    """A fresh HS256 key for one benchmark run (64 characters, above RFC 7518's 32 bytes)."""
    return secrets.token_urlsafe(48)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def raise_fd_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard limit (10k connections need 10k descriptors)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _pin(cpus: Collection[int] | None) -> Callable[[], None]:
    def in_child() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        raise_fd_limit()

    return in_child


class ServerError(RuntimeError):
    """A server did not start, or died; carries the tail of its log."""


class ServerProcess:
    """One running server. Use as a context manager: it is stopped on exit."""

    def __init__(self, kind: ServerKind, cpus: Collection[int] | None, log_dir: Path) -> None:
        self.kind = kind
        self.cpus = set(cpus) if cpus else None
        self.port = free_port()
        self.url = f"{'wss' if kind.cafile else 'ws'}://127.0.0.1:{self.port}/ws"
        self.log_path = log_dir / f"{kind.name}-{self.port}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, **kind.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*kind.argv, str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            # Set in the child before exec: single-threaded caller, so safe.
            preexec_fn=_pin(self.cpus),
            # Its own process group, so a hung server and its workers can be killed together.
            start_new_session=True,
        )
        try:
            self._wait_healthy(timeout=30)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        cafile = self.kind.cafile
        url = f"{'https' if cafile else 'http'}://127.0.0.1:{self.port}/healthz"
        context = ssl.create_default_context(cafile=cafile) if cafile else None
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise ServerError(f"{self.kind.name} exited {code}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                raise ServerError(f"{self.kind.name}: no /healthz in {timeout}s:\n{tail}")
            # Nothing to await across processes: poll the port at a short interval.
            time.sleep(0.05)

    def check_alive(self) -> None:
        """Raise :class:`ServerError` if the server has died during a scenario."""
        if self.proc.poll() is not None:
            raise ServerError(f"{self.kind.name} died ({self.proc.returncode}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> int:
        """SIGTERM, then SIGKILL of the process group after 20 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisProcess:
    """A ``redis-server`` of the benchmark's own, never the system service.

    On a free loopback port, in a temporary directory, with no persistence
    (``--save ''``, ``--appendonly no``), pinned like a server (it is part of
    the server side's cost). Use as a context manager: it is stopped on exit
    and its directory removed.
    """

    def __init__(self, cpus: Collection[int] | None, log_dir: Path) -> None:
        if not os.access(REDIS_SERVER, os.X_OK):
            raise ServerError(f"{REDIS_SERVER} not found (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.log_path = log_dir / f"redis-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self._dir,
             "--daemonize", "no", "--logfile", ""],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_pin(set(cpus) if cpus else None),
            start_new_session=True,
        )  # fmt: skip
        try:
            self._wait_ready(timeout=10)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"redis-server exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"redis-server: no PONG in {timeout}s:\n{self.log_tail()}")
            # Across processes there is nothing to await: poll at a short interval.
            time.sleep(0.05)

    def check_alive(self) -> None:
        """Raise :class:`ServerError` if Redis has died during a scenario."""
        if self.proc.poll() is not None:
            raise ServerError(f"redis-server died ({self.proc.returncode}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s), then remove the directory."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
