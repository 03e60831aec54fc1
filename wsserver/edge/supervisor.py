"""``--workers N``: N server processes on one port, one supervisor above them.

The supervisor binds the listeners once (so ``--port 0`` resolves to one
port), forks N workers that accept on the same sockets, and stays small: no
event loop, no threads. It is the one that speaks to systemd (READY=1 once
every worker serves, STOPPING=1, the watchdog while all are alive), forwards
SIGTERM/SIGINT to every worker so each drains gracefully, and restarts a
worker that dies on its own (a few times a minute at most; past that it stops
the others and exits 1, so systemd's restart policy takes over).

Limits that must hold across the workers (rooms, per-user caps and buckets,
presence) are shared through the Redis broker; the configuration refuses
``--workers`` above 1 without one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field

from wsserver import loops
from wsserver.config import Settings
from wsserver.edge.server import BoundSockets, Server, bind
from wsserver.metrics import Metrics, WorkerFiles, forget_worker
from wsserver.sdnotify import SystemdNotifier

log = logging.getLogger("wsserver.supervisor")

#: Restarts allowed within RESTART_WINDOW seconds before giving up.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Seconds all workers get to report ready.
READY_TIMEOUT = 60.0
_POLL = 0.2


@dataclass
class _Worker:
    number: int
    pid: int
    ready_fd: int
    ready: bool = False


@dataclass
class Supervisor:
    """Forks, watches and stops the workers of one ``serve --workers N``."""

    settings: Settings
    notifier: SystemdNotifier
    bound: BoundSockets | None = None
    workers: dict[int, _Worker] = field(default_factory=dict)
    _stopping: bool = False
    _restarts: list[float] = field(default_factory=list)
    #: The workers' metric files (every scrape reads them all).
    _metrics_dir: str = ""
    _started_at: float = field(default_factory=time.time)

    def run(self) -> int:
        """Serve until a signal; the exit code."""
        self._metrics_dir = tempfile.mkdtemp(prefix="wsserver-metrics-")
        try:
            return self._run()
        finally:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _run(self) -> int:
        settings = self.settings
        self.bound = bind(settings)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for number in range(settings.workers):
            self._fork(number)
        if not self._wait_ready():
            log.error("workers did not start; stopping")
            self._stop_all()
            return 1
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        log.info("%d workers serving (pids %s)", len(self.workers),
                 ", ".join(str(w.pid) for w in self.workers.values()))
        log.info("listening on %s://%s:%d/", settings.scheme, host, self.bound.port)
        self.notifier.ready()
        self.notifier.status(f"{len(self.workers)} workers serving on port {self.bound.port}")
        code = self._watch()
        self.notifier.close()
        return code

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self._stopping:
            log.info("signal %d: stopping %d worker(s)", signum, len(self.workers))
            self._stopping = True
            self.notifier.stopping()
            for worker in self.workers.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def _fork(self, number: int) -> None:
        assert self.bound is not None
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_fd)
            code = 1
            try:
                files = WorkerFiles(self._metrics_dir, number, self._started_at)
                code = _run_worker(self.settings, self.bound, number, write_fd, files)
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                os._exit(code)
        os.close(write_fd)
        self.workers[pid] = _Worker(number, pid, read_fd)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in self.workers.values()):
            if self._stopping or time.monotonic() > deadline:
                return False
            pending = {w.ready_fd: w for w in self.workers.values() if not w.ready}
            readable, _, _ = select.select(list(pending), [], [], _POLL)
            for fd in readable:
                if os.read(fd, 1):
                    pending[fd].ready = True
                else:
                    return False  # the worker exited before it served
            self._reap(restart=False)
        return True

    def _watch(self) -> int:
        interval = self.notifier.watchdog_interval
        next_watchdog = time.monotonic()
        failed = False
        while self.workers:
            if not self._reap(restart=not self._stopping):
                failed = True
                self._on_signal(signal.SIGTERM, None)
            if interval and not self._stopping and time.monotonic() >= next_watchdog:
                self.notifier.watchdog()
                next_watchdog = time.monotonic() + interval
            time.sleep(_POLL)
        return 1 if failed else 0

    def _reap(self, *, restart: bool) -> bool:
        """Collect exited workers (restarting them when asked); False when the
        restart budget is spent."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return True
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            os.close(worker.ready_fd)
            forget_worker(self._metrics_dir, worker.number)
            code = os.waitstatus_to_exitcode(status)
            if not restart:
                log.info("worker %d (pid %d) exited with %d", worker.number, pid, code)
                continue
            log.error("worker %d (pid %d) died with %d; restarting it", worker.number, pid, code)
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
            if len(self._restarts) >= MAX_RESTARTS:
                log.error("%d worker restarts within %.0fs: giving up", MAX_RESTARTS,
                          RESTART_WINDOW)
                return False
            self._restarts.append(now)
            self._fork(worker.number)

    def _stop_all(self) -> None:
        self._on_signal(signal.SIGTERM, None)
        deadline = time.monotonic() + self.settings.drain_timeout + 5
        while self.workers and time.monotonic() < deadline:
            self._reap(restart=False)
            time.sleep(_POLL)
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)


def _run_worker(settings: Settings, bound: BoundSockets, number: int, ready_fd: int,
                files: WorkerFiles) -> int:
    """In a forked worker: serve on the inherited sockets until SIGTERM."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    if settings.node_name:
        settings = settings.replace(node_name=f"{settings.node_name}-{number}")

    def ready() -> None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"R")
            os.close(ready_fd)

    # The supervisor speaks to systemd; a worker never does.
    server = Server(settings, SystemdNotifier(None), bound=bound, worker=number, on_ready=ready,
                    metrics=Metrics(files))
    loops.run(server.serve(), settings.loop)
    return 0
