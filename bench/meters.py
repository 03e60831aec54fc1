"""CPU time and resident memory of processes, from ``/proc``: what every scenario divides.

Shared by the load generator's jobs (:mod:`bench.loadgen`,
:mod:`bench.compression`) and the orchestrator (:mod:`bench.runner`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Job = dict[str, Any]
Result = dict[str, Any]


def read_rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS in /proc/PID/status), in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` so far, in seconds, to the nanosecond where it can.

    The sum of every thread's run time from ``/proc/PID/task/*/schedstat``
    (nanoseconds): ``/proc/PID/stat`` counts in clock ticks of 10 ms, which
    a smoke run's few milliseconds of server work round to zero. Threads that
    ended before the reading are not counted there; the servers measured keep
    theirs. Without schedstat (a kernel built without it), utime + stime.
    """
    if not SCHEDSTAT:
        return _ticks_seconds(pid)
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as schedstat:
                total += int(schedstat.read().split()[0])
        except FileNotFoundError:
            continue  # the thread ended since the listing
    return total / 1e9


def _ticks_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (/proc/PID/stat), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        # Fields after the ")" that ends the command name; utime and stime are 14 and 15.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU time spent by the server(s) and by this generator over one measured interval.

    Throughput on a shared machine moves with the neighbours' load; CPU time
    per message moves much less, and the generator's share shows whether it,
    rather than the server, was the limit. With several server processes (two
    nodes) their CPU times are summed; a Redis server's is reported apart.
    """

    server_pids: Sequence[int] = ()
    redis_pid: int | None = None
    _server: float = 0.0
    _redis: float = 0.0
    _own: float = 0.0
    _wall: float = 0.0

    @classmethod
    def for_job(cls, job: Job) -> CpuMeter:
        """The meter for the processes a job names (``server_pid``/``server_pids``, ``redis_pid``)."""
        pids = job.get("server_pids") or ([job["server_pid"]] if job.get("server_pid") else [])
        return cls(list(pids), job.get("redis_pid"))

    def start(self) -> None:
        self._server = sum(cpu_seconds(pid) for pid in self.server_pids)
        self._redis = cpu_seconds(self.redis_pid) if self.redis_pid else 0.0
        self._own = time.process_time()
        self._wall = time.perf_counter()

    def stop(self, units: int) -> Result:
        """Figures since :meth:`start`; ``units`` is what the CPU time is divided by."""
        wall = time.perf_counter() - self._wall
        own = time.process_time() - self._own
        out: Result = {"generator_cpu_share": own / wall if wall else None}
        if self.server_pids:
            server = sum(cpu_seconds(pid) for pid in self.server_pids) - self._server
            out["server_cpu_share"] = server / wall if wall else None
            out["server_cpu_us_per_unit"] = 1e6 * server / units if units else None
        if self.redis_pid:
            redis = cpu_seconds(self.redis_pid) - self._redis
            out["redis_cpu_share"] = redis / wall if wall else None
            out["redis_cpu_us_per_unit"] = 1e6 * redis / units if units else None
        return out


class PublishingRun(Protocol):
    """The state of a fan-out run :func:`publish_run` meters (the members update it)."""

    window: int
    publishes: int
    delivered: int
    #: perf_counter_ns() of the latest delivery.
    last_delivery_ns: int
    done: asyncio.Future[None]


class Publisher(Protocol):
    def publish(self) -> None: ...


async def publish_run(run: PublishingRun, publisher: Publisher,
                      job: Job) -> tuple[float, Result, bool]:
    """Start ``run``'s publishes (``window`` in flight; the publisher's own copies
    send the rest) and wait for every delivery, at most ``job["timeout"]``: the
    seconds from the first publish to the last delivery, the CPU figures over
    that time (per delivery), and whether it timed out."""
    meter = CpuMeter.for_job(job)
    meter.start()
    started = time.perf_counter_ns()
    for _ in range(min(run.window, run.publishes)):
        publisher.publish()
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(run.done), job["timeout"])
    except TimeoutError:
        timed_out = True
    elapsed = (run.last_delivery_ns - started) / 1e9 if run.delivered else float("nan")
    return elapsed, meter.stop(run.delivered), timed_out
