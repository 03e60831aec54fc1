"""``--workers N``: N server processes on one port, one supervisor above them.

The supervisor binds the listeners once (so ``--port 0`` resolves to one
port), forks N workers that accept on the same sockets, and stays small: no
event loop, no threads. It is the one that speaks to systemd (READY=1 once
every worker serves, STOPPING=1, the watchdog while all are alive), forwards
SIGTERM/SIGINT to every worker so each drains gracefully, and restarts a
worker that dies on its own (a few times a minute at most; past that it stops
the others and exits 1, so systemd's restart policy takes over).

Each worker's event loop writes a heartbeat byte to its pipe every
:func:`heartbeat_interval`. A worker silent for ``--worker-timeout`` (a
wedged loop, a stopped process) gets SIGTERM, SIGKILL after
:data:`KILL_GRACE`, and is replaced like a worker that died. systemd's
watchdog is fed only while every worker has been heard from lately, so a
stuck worker also shows there.

Limits that must hold across the workers (rooms, per-user caps and buckets,
presence) are shared through the Redis broker; the configuration refuses
``--workers`` above 1 without one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
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
#: Seconds a worker gets to report ready (at start and after a restart).
READY_TIMEOUT = 60.0
#: Seconds between SIGTERM and SIGKILL for a worker that went silent: a
#: wedged loop never acts on SIGTERM, a merely slow one may still exit cleanly.
KILL_GRACE = 2.0
#: Heartbeats a worker may miss and still count as alive for systemd's watchdog.
MISSED_BEATS = 3
_POLL = 0.2
_READY, _BEAT = b"R", b"H"


def heartbeat_interval(worker_timeout: float) -> float:
    """Seconds between a worker's heartbeats: ten per timeout, at least one a second."""
    return min(1.0, worker_timeout / 10)


@dataclass
class _Worker:
    number: int
    pid: int
    #: The read end of the worker's pipe: one byte when ready, then heartbeats.
    pipe: int | None
    started: float = field(default_factory=time.monotonic)
    heard: float = field(default_factory=time.monotonic)
    ready: bool = False
    #: When the supervisor sent SIGTERM to this silent worker, or None.
    killing_since: float | None = None


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
        watchdog = self.notifier.watchdog_interval
        if watchdog and settings.worker_timeout >= 2 * watchdog:
            # systemd's limit is twice the ping interval (WatchdogSec).
            log.warning(
                "--worker-timeout %gs is not below WatchdogSec (%gs): systemd restarts the "
                "whole service before a stuck worker would be replaced; lower --worker-timeout",
                settings.worker_timeout, 2 * watchdog,
            )
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
            for other in self.workers.values():
                if other.pipe is not None:
                    os.close(other.pipe)
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

    def _listen(self, timeout: float) -> bool:
        """Read what the workers wrote within ``timeout``; False when one of
        them closed its pipe before it was ready (it exited before serving)."""
        pipes = {w.pipe: w for w in self.workers.values() if w.pipe is not None}
        if not pipes:
            time.sleep(timeout)
            return True
        try:
            readable, _, _ = select.select(list(pipes), [], [], timeout)
        except InterruptedError:  # a signal; the caller's loop looks again
            return True
        now = time.monotonic()
        for fd in readable:
            worker = pipes[fd]
            data = os.read(fd, 512)
            if not data:  # the worker closed its end: it is exiting
                os.close(fd)
                worker.pipe = None
                if not worker.ready:
                    return False
                continue
            worker.heard = now
            if _READY in data:
                worker.ready = True
        return True

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in self.workers.values()):
            if self._stopping or time.monotonic() > deadline:
                return False
            if not self._listen(_POLL):
                return False
            self._reap(restart=False)
        return True

    def _watch(self) -> int:
        interval = self.notifier.watchdog_interval
        next_watchdog = time.monotonic()
        failed = False
        while self.workers:
            self._listen(_POLL)
            if not self._stopping:
                self._stop_silent_workers()
            if not self._reap(restart=not self._stopping):
                failed = True
                self._on_signal(signal.SIGTERM, None)
            now = time.monotonic()
            # Fed only while every worker is alive: systemd then sees a stuck
            # worker too, and restarts the service if it is never replaced.
            if interval and not self._stopping and now >= next_watchdog and self._all_alive(now):
                self.notifier.watchdog()
                next_watchdog = now + interval
        return 1 if failed else 0

    def _all_alive(self, now: float) -> bool:
        """True when every worker is starting (within READY_TIMEOUT) or beat lately."""
        window = MISSED_BEATS * heartbeat_interval(self.settings.worker_timeout)
        return all(
            (now - w.started < READY_TIMEOUT) if not w.ready else (now - w.heard <= window)
            for w in self.workers.values()
        )

    def _stop_silent_workers(self) -> None:
        """SIGTERM a worker silent for --worker-timeout, SIGKILL after KILL_GRACE;
        the reaper then replaces it."""
        now = time.monotonic()
        timeout = self.settings.worker_timeout
        for worker in self.workers.values():
            if worker.killing_since is not None:
                if now - worker.killing_since >= KILL_GRACE:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
                continue
            limit = timeout if worker.ready else READY_TIMEOUT
            silent = now - (worker.heard if worker.ready else worker.started)
            if silent >= limit:
                log.error(
                    "worker %d (pid %d) silent for %.1f s (--worker-timeout %g): its event "
                    "loop is stuck; killing and replacing it", worker.number, worker.pid,
                    silent, timeout,
                )
                worker.killing_since = now
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

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
            if worker.pipe is not None:
                os.close(worker.pipe)
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


def _pipe_writer(fd: int) -> Callable[[bytes], None]:
    """Writes to the supervisor's pipe that never block the loop (a full pipe
    means the supervisor is not reading: the beat is dropped)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    def write(data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(fd, data)

    return write


def _run_worker(settings: Settings, bound: BoundSockets, number: int, pipe: int,
                files: WorkerFiles) -> int:
    """In a forked worker: serve on the inherited sockets until SIGTERM."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    if settings.node_name:
        settings = settings.replace(node_name=f"{settings.node_name}-{number}")
    write = _pipe_writer(pipe)
    # The supervisor speaks to systemd; a worker never does.
    server = Server(
        settings, SystemdNotifier(None), bound=bound, worker=number,
        on_ready=lambda: write(_READY), metrics=Metrics(files),
        heartbeat=(lambda: write(_BEAT), heartbeat_interval(settings.worker_timeout)),
    )
    loops.run(server.serve(), settings.loop)
    return 0
