"""TaskPool: CPU-heavy tasks in worker processes, bounded, timed and replaceable.

Why not one ``ProcessPoolExecutor(max_workers=N)``: when one of its processes
dies it marks itself broken and fails *every* pending future, and it has no
way to stop the one process running a task that ran out of time. So the pool
is ``N`` single-process executors (:class:`_Worker`), handed out by an asyncio
queue of idle workers. Killing or losing one worker touches only the task it
was running; the pool replaces it and goes on serving.

Workers are started through the "forkserver" method (never ``fork()`` of a
process that runs an event loop and threads), run at a lower CPU priority so
the event loop stays responsive when every core is busy, and import
``--tasks-module`` so user tasks resolve there.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from wsserver.errors import BadRequest, Busy, TaskFailed, TaskTimeout
from wsserver.metrics import Metrics
from wsserver.tasks import Task, TaskTable

__all__ = ["WORKER_NICENESS", "TaskPool"]

logger = logging.getLogger("wsserver.pool")

#: Added to the workers' nice value: the event loop wins the CPU when both want it.
WORKER_NICENESS = 10

#: Seconds shutdown() waits for one killed worker's executor to wind down.
SHUTDOWN_JOIN_TIMEOUT = 5.0

def _init_worker(server_pid: int, tasks_module: str | None) -> None:
    """Runs first in every worker process."""
    # The server handles Ctrl-C and stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    threading.Thread(
        target=_exit_when_gone, args=(server_pid,), name="wsserver-server-watch", daemon=True
    ).start()
    # multiprocessing has already given this process the server's sys.path.
    if tasks_module:
        importlib.import_module(tasks_module)


def _exit_when_gone(server_pid: int) -> None:
    """In a worker: end this process as soon as the server process has ended.

    A server killed outright (SIGKILL, OOM killer) runs no shutdown, and
    nothing else would stop its workers: each holds the forkserver's liveness
    pipe open and its own call queue's write end, so they would live on.
    """
    try:
        pidfd = os.pidfd_open(server_pid)
    except ProcessLookupError:
        os._exit(1)
    except OSError:  # no pidfd (Linux before 5.3): look once a second
        while True:
            time.sleep(1.0)
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
    select.select([pidfd], [], [])  # readable once the server has exited
    os._exit(1)


class _Worker:
    """One worker process in an executor of its own, so it can be killed alone."""

    def __init__(self, context: Any, tasks_module: str | None) -> None:
        self.executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=context,
            initializer=_init_worker,
            initargs=(os.getpid(), tasks_module),
        )
        # Start the process now rather than when the first task arrives.
        self.executor.submit(os.getpid)
        self._manager: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        processes = self.executor._processes  # the executor keeps no public list
        return list(processes) if processes else []

    def submit(self, func: Callable[..., Any], kwargs: dict[str, Any]) -> Future[Any]:
        return self.executor.submit(func, **kwargs)

    def kill(self) -> None:
        """SIGKILL the process (whatever it runs) and let the executor wind down.

        The executor's management thread notices the death, fails what was
        pending and joins the process; this does not wait for it (see :meth:`join`).
        """
        executor = self.executor
        manager = executor._executor_manager_thread  # None once shut down
        if isinstance(manager, threading.Thread):
            self._manager = manager
        processes = executor._processes
        for process in list(processes.values()) if processes else []:
            process.kill()
        executor.shutdown(wait=False)

    def join(self, timeout: float) -> None:
        """Wait until the executor's management thread is gone (after :meth:`kill`)."""
        if self._manager is not None:
            self._manager.join(timeout)


class TaskPool:
    """A bounded pool of worker processes running the tasks of a :class:`TaskTable`.

    Args:
        table: the tasks that can be run.
        workers: worker processes.
        queue: tasks waiting or running at once; beyond it, :class:`Busy`.
        timeout: seconds from acceptance to answer before :class:`TaskTimeout`.
        tasks_module: module the workers import (``--tasks-module``).
        metrics: where to count tasks, if anywhere.
    """

    def __init__(
        self,
        table: TaskTable,
        *,
        workers: int,
        queue: int,
        timeout: float,
        tasks_module: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if queue < workers:
            raise ValueError("queue must be at least workers")
        if not timeout > 0:
            raise ValueError("timeout must be above 0")
        self._table = table
        self._size = workers
        self._queue = queue
        self._timeout = timeout
        self._tasks_module = tasks_module
        self._metrics = metrics
        self._context = multiprocessing.get_context("forkserver")
        self._workers: set[_Worker] = set()
        self._retired: list[_Worker] = []
        # None in the queue means "the pool has shut down" to whoever waits.
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
        self._in_flight = 0
        self._started = False
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Tasks accepted and not yet answered: waiting for a worker or running."""
        return self._in_flight

    @property
    def table(self) -> TaskTable:
        """The tasks this pool runs (``name in pool.table`` tells a known name)."""
        return self._table

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [pid for worker in self._workers for pid in worker.pids]

    def start(self) -> None:
        """Start the worker processes (once, before the first :meth:`run`)."""
        if self._started:
            return
        self._started = True
        for _ in range(self._size):
            self._idle.put_nowait(self._new_worker())

    async def run(self, name: Any, args: Any) -> Any:
        """Validate, run task ``name`` with ``args`` in a worker, and return its value.

        The same as :meth:`prepare` then :meth:`execute`.

        Raises:
            UnknownTask, BadRequest: from :meth:`prepare`; nothing was submitted.
            Busy, TaskTimeout, TaskFailed: from :meth:`execute`.
        """
        task, kwargs = self.prepare(name, args)
        return await self.execute(task, kwargs)

    def prepare(self, name: Any, args: Any) -> tuple[Task, dict[str, Any]]:
        """Look up and validate a task, counting a bad request in the metrics.

        Raises:
            UnknownTask: no task has that name.
            BadRequest: the arguments do not fit the task's parameters.
        """
        task = self._table.get(name)
        try:
            kwargs = task.validate(args)
        except BadRequest:
            self._count(task.name, "bad_request")
            raise
        return task, kwargs

    async def execute(self, task: Task, kwargs: dict[str, Any]) -> Any:
        """Run a task :meth:`prepare` accepted in a worker, and return its value.

        Raises:
            Busy: ``queue`` tasks are already waiting or running, or the pool
                is not running.
            TaskTimeout: no answer within ``timeout`` seconds; a worker still
                running the task has been replaced.
            TaskFailed: the task raised, or its worker process died.
        """
        if not self._started or self._closed:
            raise Busy("the task pool is not running")
        if self._in_flight >= self._queue:
            self._count(task.name, "busy")
            raise Busy(f"the task pool is full ({self._queue} tasks); try again later")

        self._in_flight += 1
        self._show_depth()
        started = time.monotonic()
        outcome = "task_failed"
        try:
            async with asyncio.timeout(self._timeout):
                value = await self._execute(task, kwargs)
            outcome = "ok"
            return value
        except TimeoutError:
            outcome = "timeout"
            raise TaskTimeout(
                f"task {task.name!r} did not finish within {self._timeout:g} seconds"
            ) from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._in_flight -= 1
            self._show_depth()
            self._count(task.name, outcome, time.monotonic() - started)

    async def _execute(self, task: Task, kwargs: dict[str, Any]) -> Any:
        worker = await self._idle.get()
        if worker is None:
            self._idle.put_nowait(None)  # for the next one waiting
            raise TaskFailed("the task pool shut down")
        # From here this coroutine owns `worker` until it gives it back or replaces it.
        try:
            future = worker.submit(task.func, kwargs)
        except BrokenProcessPool:
            # It died while idle (killed from outside): nothing of ours ran there.
            replacement = self._replace(worker)
            if replacement is None:
                raise TaskFailed("the task pool shut down") from None
            worker = replacement
            future = worker.submit(task.func, kwargs)
        try:
            value = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # Timed out, or the caller went away: free the worker now rather
            # than when the task ends, which may be never.
            self._give_back(self._replace(worker))
            raise
        except BrokenProcessPool:
            logger.warning("a worker process died running task %r; replacing it", task.name)
            self._give_back(self._replace(worker))
            raise TaskFailed(f"the worker running task {task.name!r} died") from None
        except Exception as exc:
            # The task raised; the worker process is fine.
            logger.warning("task %r raised %s", task.name, type(exc).__name__, exc_info=exc)
            self._give_back(worker)
            raise TaskFailed(f"task {task.name!r} failed: {type(exc).__name__}") from None
        self._give_back(worker)
        return value

    def shutdown(self) -> None:
        """Stop every worker process and wait until they are gone. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        workers = list(self._workers) + self._retired
        self._workers.clear()
        self._retired.clear()
        # Kill all first, then wait: the waits overlap.
        for worker in workers:
            worker.kill()
        for worker in workers:
            worker.join(SHUTDOWN_JOIN_TIMEOUT)
        self._idle.put_nowait(None)  # wakes whoever waits for a worker

    def _new_worker(self) -> _Worker:
        worker = _Worker(self._context, self._tasks_module)
        self._workers.add(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker | None:
        """Kill ``worker`` and start another in its place (none once shut down)."""
        worker.kill()
        self._workers.discard(worker)
        # Kept so that shutdown() can wait for its management thread; those
        # of older ones have long finished.
        self._retired = [*self._retired[-4 * self._size :], worker]
        return None if self._closed else self._new_worker()

    def _give_back(self, worker: _Worker | None) -> None:
        if worker is not None and not self._closed:
            self._idle.put_nowait(worker)

    def _count(self, name: str, outcome: str, duration: float | None = None) -> None:
        if self._metrics is None:
            return
        self._metrics.tasks.labels(name=name, outcome=outcome).inc()
        if duration is not None:
            self._metrics.task_duration.labels(name=name).observe(duration)

    def _show_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.task_queue_depth.set(self._in_flight)
