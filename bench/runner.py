"""The scenarios: each runs wsserver and the baseline in the same run, then compares.

A scenario starts fresh servers, runs the load generator (:mod:`bench.loadgen`,
a subprocess on its own core) against each of them in turn, ``rounds`` times
interleaved (wsserver, baseline, wsserver, baseline, ...) so drift on this
shared machine hits both alike, and keeps the median round of each.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.servers import (
    ServerKind,
    ServerProcess,
    baseline_kind,
    baseline_uvloop_kind,
    uvicorn_kind,
    wsserver_kind,
)

Result = dict[str, Any]


@dataclass(frozen=True)
class Params:
    """Sizes of every scenario; :data:`FULL` and :data:`SMOKE` are the two presets."""

    echo_connections: int
    echo_warmup: float
    echo_duration: float
    echo_rounds: int
    idle_connections: int
    idle_warmup_connections: int
    idle_rounds: int
    fanout_members: int
    fanout_publishes: int
    fanout_window: int
    fanout_rounds: int
    loop_warmup: float
    loop_duration: float
    loop_interval: float
    loop_primes_limit: int
    loop_taskers: int
    loop_in_flight: int


FULL = Params(
    echo_connections=50, echo_warmup=1.0, echo_duration=5.0, echo_rounds=3,
    idle_connections=10_000, idle_warmup_connections=50, idle_rounds=3,
    fanout_members=1000, fanout_publishes=200, fanout_window=10, fanout_rounds=3,
    loop_warmup=1.0, loop_duration=10.0, loop_interval=0.01,
    loop_primes_limit=50_000_000, loop_taskers=3, loop_in_flight=2,
)  # fmt: skip

SMOKE = Params(
    echo_connections=10, echo_warmup=0.2, echo_duration=0.5, echo_rounds=1,
    idle_connections=200, idle_warmup_connections=10, idle_rounds=1,
    fanout_members=50, fanout_publishes=10, fanout_window=5, fanout_rounds=1,
    loop_warmup=0.2, loop_duration=0.5, loop_interval=0.01,
    loop_primes_limit=5_000_000, loop_taskers=3, loop_in_flight=2,
)  # fmt: skip


class LoadgenError(RuntimeError):
    """The load generator failed; carries its stderr."""


def split_cpus() -> tuple[set[int] | None, set[int] | None]:
    """Server and generator CPU sets: the first two CPUs we may use, or no pinning on one."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


@dataclass
class Bench:
    """What every scenario needs: sizes, the run's JWT key, CPUs, a log directory."""

    params: Params
    secret: str
    log_dir: Path
    server_cpus: set[int] | None
    generator_cpus: set[int] | None
    # 127.0.0.2 ... 127.0.0.254: a fresh pair of source addresses per load-generator run,
    # so one run's TIME_WAIT sockets never crowd the next run's ephemeral ports.
    _sources: Iterator[int] = field(default_factory=lambda: itertools.cycle(range(2, 254)))

    def kinds(self) -> tuple[ServerKind, ServerKind]:
        return wsserver_kind(self.secret), baseline_kind()

    def loadgen(self, scenario: str, server: ServerProcess, **job: Any) -> Result:
        """Run one load-generator job against ``server``; its JSON result."""
        job.update(
            scenario=scenario,
            url=server.url,
            jwt_user=server.kind.jwt_user,
            cpus=sorted(self.generator_cpus or ()),
            source_addresses=[f"127.0.0.{next(self._sources)}" for _ in range(2)],
        )
        proc = subprocess.run(
            [sys.executable, "-m", "bench.loadgen"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "BENCH_JWT_SECRET": self.secret},
        )
        server.check_alive()
        if proc.returncode != 0:
            raise LoadgenError(
                f"{scenario} against {server.kind.name} failed:\n{proc.stderr[-3000:]}\n"
                f"server log:\n{server.log_tail()}"
            )
        result: Result = json.loads(proc.stdout)
        return result

    def start(self, kind: ServerKind, cpus: set[int] | None) -> ServerProcess:
        return ServerProcess(kind, cpus, self.log_dir)


def median_round(rounds: Sequence[Result], key: str) -> Result:
    """The round whose ``key`` is the median (the lower one for an even count)."""
    ordered = sorted(rounds, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def interleaved(
    bench: Bench,
    servers: Sequence[ServerProcess],
    rounds: int,
    job: Callable[[ServerProcess], Result],
    key: str,
) -> Result:
    """Run ``job`` against each server, ``rounds`` times interleaved; rounds and median."""
    runs: dict[str, list[Result]] = {srv.kind.name: [] for srv in servers}
    for _ in range(rounds):
        for srv in servers:
            runs[srv.kind.name].append(job(srv))
    return {
        name: {"median": median_round(results, key), "rounds": results}
        for name, results in runs.items()
    }


def uvicorn_available() -> str | None:
    """None when FastAPI and uvicorn[standard] are importable, else why not."""
    missing = [m for m in ("fastapi", "uvicorn", "uvloop", "httptools") if not _importable(m)]
    if missing:
        return "not installed: " + ", ".join(missing) + " (pip install fastapi 'uvicorn[standard]')"
    return None


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --- the scenarios -----------------------------------------------------------


def echo(bench: Bench) -> Result:
    """50 connections in a closed loop; messages/s, p50, p99.

    With ``uvicorn[standard]`` installed (the stretch comparison), also FastAPI
    under uvicorn, and the baseline on uvloop (uvicorn's event loop) to show
    how much of the gap the event loop alone accounts for.
    """
    p = bench.params
    ws_kind, base_kind = bench.kinds()
    skipped = uvicorn_available()

    def job(srv: ServerProcess) -> Result:
        return bench.loadgen(
            "echo", srv,
            connections=p.echo_connections, warmup=p.echo_warmup, duration=p.echo_duration,
            server_pid=srv.pid,
        )  # fmt: skip

    with bench.start(ws_kind, bench.server_cpus) as ws, bench.start(
        base_kind, bench.server_cpus
    ) as base:
        if skipped is None:
            with bench.start(uvicorn_kind(), bench.server_cpus) as uv, bench.start(
                baseline_uvloop_kind(), bench.server_cpus
            ) as base_uv:
                servers = [ws, base, uv, base_uv]
                result = interleaved(bench, servers, p.echo_rounds, job, "messages_per_s")
        else:
            result = interleaved(bench, [ws, base], p.echo_rounds, job, "messages_per_s")
            result["uvicorn"] = result["baseline_uvloop"] = {"skipped": skipped}
    return result


def idle(bench: Bench) -> Result:
    """10,000 authenticated idle connections: connects/s and server RSS per connection.

    Every round starts fresh servers (memory must be read from a clean
    process); rounds alternate between the servers like the other scenarios.
    """
    p = bench.params
    runs: dict[str, list[Result]] = {kind.name: [] for kind in bench.kinds()}
    for _ in range(p.idle_rounds):
        for kind in bench.kinds():
            with bench.start(kind, bench.server_cpus) as srv:
                run = bench.loadgen(
                    "idle", srv,
                    connections=p.idle_connections,
                    warmup_connections=p.idle_warmup_connections,
                    server_pid=srv.pid,
                )  # fmt: skip
            runs[kind.name].append(run)
    result: Result = {
        name: {"median": median_round(rounds, "connects_per_s"), "rounds": rounds}
        for name, rounds in runs.items()
    }
    result["note"] = (
        "RSS is the server process alone (VmRSS); wsserver's task-pool workers are "
        "separate processes, hold no connection state and are not counted"
    )
    return result


def fanout(bench: Bench) -> Result:
    """1,000 members in one room, N publishes; deliveries/s, every message to every member."""
    p = bench.params

    def job(srv: ServerProcess) -> Result:
        return bench.loadgen(
            "fanout", srv,
            members=p.fanout_members, publishes=p.fanout_publishes, window=p.fanout_window,
            timeout=120, server_pid=srv.pid,
        )  # fmt: skip

    ws_kind, base_kind = bench.kinds()
    with bench.start(ws_kind, bench.server_cpus) as ws, bench.start(
        base_kind, bench.server_cpus
    ) as base:
        return interleaved(bench, [ws, base], p.fanout_rounds, job, "deliveries_per_s")


def loop(bench: Bench) -> Result:
    """Ping latency with the task pool idle, saturated, and (baseline) the task inline.

    Neither server is pinned here: wsserver's pool workers (one per CPU by
    default) must be free to use every core, as they would in production, and
    the question is whether the event loop still gets its turn among them.
    """
    p = bench.params
    task = {"name": "primes", "args": {"limit": p.loop_primes_limit}}
    common = {
        "warmup": p.loop_warmup, "duration": p.loop_duration, "interval": p.loop_interval,
        # How long to wait for the last pongs; a starved loop may not answer in time.
        "grace": 5.0,
    }  # fmt: skip
    result: Result = {"task": task, "server_cpus": "all (not pinned)"}
    for kind in bench.kinds():
        with bench.start(kind, None) as srv:
            quiet = bench.loadgen("loop", srv, task=task, taskers=0, in_flight=0, **common)
            loaded = bench.loadgen(
                "loop", srv, task=task, taskers=p.loop_taskers, in_flight=p.loop_in_flight,
                **common,
            )  # fmt: skip
        result[kind.name] = {"median": loaded, "rounds": [loaded], "pool_idle": quiet}
    return result


SCENARIOS: dict[str, Callable[[Bench], Result]] = {
    "echo": echo,
    "idle": idle,
    "fanout": fanout,
    "loop": loop,
}


def params_dict(params: Params) -> dict[str, Any]:
    return asdict(params)
