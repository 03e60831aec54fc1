"""TaskPool: CPU-heavy tasks in worker processes, bounded, timed and replaceable.

Why not one ``ProcessPoolExecutor(max_workers=N)``: when one of its processes
dies it marks itself broken and fails *every* pending future, and it has no
way to stop the one process running a task that ran out of time. So the pool
is ``N`` single-process executors (:class:`_Worker`), handed out by an asyncio
list of idle workers. Killing or losing one worker touches only the task it
was running; the pool replaces it and goes on serving.

Fairness: each task belongs to a *user* (whose tasks in flight are bounded by
``per_user``) and an *owner* (a connection). When tasks wait for a worker, the
next free worker goes to the waiting user with the fewest tasks running, and
among those to the one served least recently: one user's backlog cannot starve
another user. :meth:`TaskPool.cancel_owner` ends an owner's tasks (a closed
connection's): waiting ones are dropped, and a worker running one is killed
and replaced, as on a timeout.

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
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from wsserver.errors import BadRequest, Busy, TaskCancelled, TaskFailed, TaskTimeout
from wsserver.internals import executor_processes
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
        self._reaper: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        return list(executor_processes(self.executor))

    def submit(self, func: Callable[..., Any], kwargs: dict[str, Any]) -> Future[Any]:
        return self.executor.submit(func, **kwargs)

    def kill(self) -> None:
        """SIGKILL the process (whatever it runs) and let the executor wind down.

        The executor's management thread notices the death, fails what was
        pending and joins the process; ``shutdown(wait=True)``, run in a
        thread of its own, waits for that, so this does not (see :meth:`join`).
        """
        executor = self.executor
        for process in executor_processes(executor).values():
            process.kill()
        if self._reaper is None:
            self._reaper = threading.Thread(
                target=executor.shutdown, kwargs={"wait": True},
                name="wsserver-task-worker-reaper", daemon=True,
            )
            self._reaper.start()

    def join(self, timeout: float) -> None:
        """Wait until the executor has wound down (after :meth:`kill`)."""
        if self._reaper is not None:
            self._reaper.join(timeout)


@dataclass(eq=False)
class _Job:
    """One accepted task, from its acceptance to its answer."""

    user: Hashable
    owner: Hashable
    #: While waiting for a worker: resolved with one (None: the pool shut down).
    waiter: asyncio.Future[_Worker | None] | None = None
    #: While running: the worker's answer.
    running: asyncio.Future[Any] | None = None
    #: In its user's waiting line.
    queued: bool = False
    #: Set by cancel_owner().
    cancelled: bool = False


@dataclass(eq=False)
class _UserQueue:
    """A user's share of the pool: its tasks waiting, running, and its turn."""

    waiting: deque[_Job] = field(default_factory=deque)
    running: int = 0
    in_flight: int = 0
    #: When it last got a worker (a pool-wide sequence number).
    served: int = 0


class TaskPool:
    """A bounded pool of worker processes running the tasks of a :class:`TaskTable`.

    Args:
        table: the tasks that can be run.
        workers: worker processes.
        queue: tasks waiting or running at once; beyond it, :class:`Busy`.
        timeout: seconds from acceptance to answer before :class:`TaskTimeout`.
        tasks_module: module the workers import (``--tasks-module``).
        metrics: where to count tasks, if anywhere.
        per_user: tasks in flight per user at once (None: only ``queue``).
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
        per_user: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if queue < workers:
            raise ValueError("queue must be at least workers")
        if not timeout > 0:
            raise ValueError("timeout must be above 0")
        if per_user is not None and per_user < 1:
            raise ValueError("per_user must be at least 1")
        self._table = table
        self._size = workers
        self._queue = queue
        self._timeout = timeout
        self._tasks_module = tasks_module
        self._metrics = metrics
        self._context = multiprocessing.get_context("forkserver")
        self._workers: set[_Worker] = set()
        self._retired: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._per_user = per_user
        self._users: dict[Hashable, _UserQueue] = {}
        self._owners: dict[Hashable, set[_Job]] = {}
        self._waiting = 0
        self._serial = 0
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
            self._idle.append(self._new_worker())

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

    async def execute(
        self,
        task: Task,
        kwargs: dict[str, Any],
        *,
        user: Hashable = None,
        owner: Hashable = None,
    ) -> Any:
        """Run a task :meth:`prepare` accepted in a worker, and return its value.

        Args:
            user: whose task it is: bounded by ``per_user``, and served
                fairly against other users (None: one shared user).
            owner: what the task belongs to, for :meth:`cancel_owner` (a
                connection; None: nothing, it cannot be cancelled that way).

        Raises:
            Busy: ``queue`` tasks are already waiting or running, ``user`` has
                ``per_user`` tasks in flight, or the pool is not running.
            TaskTimeout: no answer within ``timeout`` seconds; a worker still
                running the task has been replaced.
            TaskCancelled: :meth:`cancel_owner` ended it.
            TaskFailed: the task raised, or its worker process died.
        """
        if not self._started or self._closed:
            raise Busy("the task pool is not running")
        if self._in_flight >= self._queue:
            self._count(task.name, "busy")
            raise Busy(f"the task pool is full ({self._queue} tasks); try again later")
        share = self._users.get(user)
        if self._per_user is not None and share is not None and share.in_flight >= self._per_user:
            self._count(task.name, "busy")
            raise Busy(f"at most {self._per_user} tasks in flight per user")

        if share is None:
            share = self._users[user] = _UserQueue()
        job = _Job(user, owner)
        share.in_flight += 1
        if owner is not None:
            self._owners.setdefault(owner, set()).add(job)
        self._in_flight += 1
        self._show_depth()
        started = time.monotonic()
        outcome = "task_failed"
        try:
            async with asyncio.timeout(self._timeout):
                value = await self._execute(task, kwargs, job, share)
            outcome = "ok"
            return value
        except TimeoutError:
            outcome = "timeout"
            raise TaskTimeout(
                f"task {task.name!r} did not finish within {self._timeout:g} seconds"
            ) from None
        except (asyncio.CancelledError, TaskCancelled):
            outcome = "cancelled"
            raise
        finally:
            self._in_flight -= 1
            share.in_flight -= 1
            if not share.in_flight:
                del self._users[user]
            if owner is not None:
                jobs = self._owners[owner]
                jobs.discard(job)
                if not jobs:
                    del self._owners[owner]
            self._show_depth()
            self._count(task.name, outcome, time.monotonic() - started)

    def cancel_owner(self, owner: Hashable) -> int:
        """End every task of ``owner``: drop those waiting for a worker, and
        kill (and replace) the worker of those running. Their :meth:`execute`
        raises :class:`TaskCancelled`. Returns how many were ended."""
        jobs = self._owners.get(owner, ())
        ended = 0
        for job in list(jobs):
            if job.cancelled:
                continue
            job.cancelled = True
            ended += 1
            # Cancelling the awaited future wakes execute() at once; the
            # running branch there replaces the worker.
            if job.waiter is not None and not job.waiter.done():
                job.waiter.cancel()
            elif job.running is not None and not job.running.done():
                job.running.cancel()
        return ended

    async def _execute(
        self, task: Task, kwargs: dict[str, Any], job: _Job, share: _UserQueue
    ) -> Any:
        worker = await self._acquire(job, share)
        # From here this coroutine owns `worker` until it gives it back or replaces it.
        share.running += 1
        try:
            return await self._run_on(worker, task, kwargs, job)
        finally:
            share.running -= 1

    async def _acquire(self, job: _Job, share: _UserQueue) -> _Worker:
        """A worker for ``job``: at once when one is idle and nobody waits,
        else when :meth:`_dispatch` picks this job."""
        if job.cancelled:
            raise TaskCancelled("cancelled")
        if self._idle and not self._waiting:
            self._serial += 1
            share.served = self._serial
            return self._idle.pop()
        waiter: asyncio.Future[_Worker | None] = asyncio.get_running_loop().create_future()
        job.waiter = waiter
        job.queued = True
        share.waiting.append(job)
        self._waiting += 1
        try:
            worker = await waiter
        except asyncio.CancelledError:
            if job.queued:
                job.queued = False
                share.waiting.remove(job)
                self._waiting -= 1
            elif waiter.done() and not waiter.cancelled():
                # Handed a worker, then cancelled before running: pass it on.
                self._give_back(waiter.result())
            if job.cancelled:
                raise TaskCancelled("the task's connection closed") from None
            raise
        finally:
            job.waiter = None
        if worker is None:
            raise TaskFailed("the task pool shut down")
        return worker

    def _dispatch(self) -> None:
        """Hand idle workers to waiting jobs: the user with the fewest tasks
        running goes first, then the one served least recently."""
        while self._idle and self._waiting:
            share = min(
                (q for q in self._users.values() if q.waiting),
                key=lambda q: (q.running, q.served),
            )
            job = share.waiting.popleft()
            job.queued = False
            self._waiting -= 1
            if job.waiter is None or job.waiter.done():
                continue  # cancelled, and not yet woken to leave the line
            self._serial += 1
            share.served = self._serial
            job.waiter.set_result(self._idle.pop())

    async def _run_on(
        self, worker: _Worker, task: Task, kwargs: dict[str, Any], job: _Job
    ) -> Any:
        try:
            future = worker.submit(task.func, kwargs)
        except BrokenProcessPool:
            # It died while idle (killed from outside): nothing of ours ran there.
            replacement = self._replace(worker)
            if replacement is None:
                raise TaskFailed("the task pool shut down") from None
            worker = replacement
            future = worker.submit(task.func, kwargs)
        job.running = asyncio.wrap_future(future)
        try:
            value = await job.running
        except asyncio.CancelledError:
            # Timed out, the caller went away, or cancel_owner(): free the
            # worker now rather than when the task ends, which may be never.
            self._give_back(self._replace(worker))
            if job.cancelled:
                raise TaskCancelled("the task's connection closed") from None
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
        finally:
            job.running = None
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
        self._idle.clear()
        # Wake whoever waits for a worker: None means "shut down".
        for share in self._users.values():
            while share.waiting:
                job = share.waiting.popleft()
                job.queued = False
                if job.waiter is not None and not job.waiter.done():
                    job.waiter.set_result(None)
        self._waiting = 0

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
            self._idle.append(worker)
            self._dispatch()

    def _count(self, name: str, outcome: str, duration: float | None = None) -> None:
        if self._metrics is None:
            return
        self._metrics.tasks.labels(name=name, outcome=outcome).inc()
        if duration is not None:
            self._metrics.task_duration.labels(name=name).observe(duration)

    def _show_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.task_queue_depth.set(self._in_flight)
