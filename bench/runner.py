"""The scenarios: each runs wsserver and the baseline in the same run, then compares.

A scenario starts fresh servers, runs the load generator (:mod:`bench.loadgen`,
a subprocess on its own core) against each of them in turn, ``rounds`` times
interleaved (wsserver, baseline, wsserver, baseline, ...) so drift on this
shared machine hits both alike, and keeps the median round of each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import c100k, payloads
from bench.meters import cpu_seconds
from bench.servers import (
    RedisProcess,
    ServerKind,
    ServerProcess,
    baseline_kind,
    baseline_uvloop_kind,
    node_ws_available,
    node_ws_kind,
    proxy_backend_kind,
    renamed,
    uvicorn_kind,
    wsserver_kind,
)
from bench.tlscert import make_cert

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
    recovery_messages: int
    recovery_joins: int
    churn_rate: float
    proxy_connections: int
    proxy_rounds: int
    drain_connections: int
    drain_rate: int
    stream_members: int
    stream_publishes: int
    stream_idle_connections: int

    #: Issue 21: one publish at a time into this many members (against Node ``ws``).
    fanout_single_members: int
    compression_members: int
    compression_publishes: int
    sweep_sizes: tuple[int, ...]
    sweep_messages: int
    #: The ``c100k`` scenario (not in the default run): one node, then one machine.
    c100k_node_connections: int
    c100k_machine_connections: int
    c100k_workers: int
    c100k_generators: int
    c100k_room_members: int
    c100k_publishes: int


SWEEP_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)

FULL = Params(
    echo_connections=50, echo_warmup=1.0, echo_duration=5.0, echo_rounds=3,
    idle_connections=10_000, idle_warmup_connections=50, idle_rounds=3,
    fanout_members=1000, fanout_publishes=200, fanout_window=10, fanout_rounds=3,
    loop_warmup=1.0, loop_duration=10.0, loop_interval=0.01,
    loop_primes_limit=50_000_000, loop_taskers=3, loop_in_flight=2,
    recovery_messages=300, recovery_joins=7, churn_rate=20.0,
    proxy_connections=3000, proxy_rounds=3,
    drain_connections=2000, drain_rate=500,
    fanout_single_members=500, compression_members=500, compression_publishes=100,
    sweep_sizes=SWEEP_SIZES, sweep_messages=500,
    c100k_node_connections=19_000, c100k_machine_connections=100_000, c100k_workers=6,
    c100k_generators=6, c100k_room_members=10_000, c100k_publishes=3,
    stream_members=500, stream_publishes=200, stream_idle_connections=5000,
)  # fmt: skip

SMOKE = Params(
    echo_connections=10, echo_warmup=0.2, echo_duration=0.5, echo_rounds=1,
    idle_connections=200, idle_warmup_connections=10, idle_rounds=1,
    fanout_members=50, fanout_publishes=10, fanout_window=5, fanout_rounds=1,
    loop_warmup=0.2, loop_duration=0.5, loop_interval=0.01,
    loop_primes_limit=5_000_000, loop_taskers=3, loop_in_flight=2,
    # The recovery is the contract's 300 (--max-recovery's default) in both presets.
    recovery_messages=300, recovery_joins=3, churn_rate=20.0,
    proxy_connections=200, proxy_rounds=1,
    drain_connections=200, drain_rate=100,
    fanout_single_members=50, compression_members=20, compression_publishes=5,
    sweep_sizes=SWEEP_SIZES, sweep_messages=10,
    c100k_node_connections=300, c100k_machine_connections=600, c100k_workers=2,
    c100k_generators=2, c100k_room_members=200, c100k_publishes=2,
    stream_members=50, stream_publishes=10, stream_idle_connections=200,
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
    _node_ws: ServerKind | str | None = None

    def kinds(self) -> tuple[ServerKind, ServerKind]:
        return wsserver_kind(self.secret), baseline_kind()

    def node_ws(self) -> ServerKind | str:
        """The Node ``ws`` baseline, or why it cannot run (npm missing, install failed)."""
        if self._node_ws is None:
            skipped = node_ws_available()
            self._node_ws = node_ws_kind() if skipped is None else skipped
        return self._node_ws

    def loop_variants(self) -> tuple[ServerKind, ServerKind]:
        """wsserver on asyncio's loop and the baseline on uvloop: the same-loop pairs.

        wsserver runs on uvloop by default (``--loop auto``), the baseline on
        asyncio's loop; these two show how much of a ratio is the loop.
        """
        return (renamed(wsserver_kind(self.secret), "wsserver_asyncio", ["--loop", "asyncio"]),
                baseline_uvloop_kind())  # fmt: skip

    def loadgen(
        self,
        scenario: str,
        server: ServerProcess,
        also: Sequence[ServerProcess | RedisProcess] = (),
        **job: Any,
    ) -> Result:
        """Run one load-generator job against ``server``; its JSON result.

        ``also``: the other processes the job relies on (a second node,
        Redis), checked alive afterwards like ``server``.
        """
        job.update(
            scenario=scenario,
            url=server.url,
            jwt_user=server.kind.jwt_user,
            cpus=sorted(self.generator_cpus or ()),
            cafile=server.kind.cafile,
        )
        job.setdefault("source_addresses", [f"127.0.0.{next(self._sources)}" for _ in range(2)])
        proc = subprocess.run(
            [sys.executable, "-m", "bench.loadgen"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "BENCH_JWT_SECRET": self.secret},
        )
        server.check_alive()
        for other in also:
            other.check_alive()
        if proc.returncode != 0:
            others = "".join(f"\n{o.log_path.name}:\n{o.log_tail()}" for o in also)
            raise LoadgenError(
                f"{scenario} against {server.kind.name} failed:\n{proc.stderr[-3000:]}\n"
                f"server log:\n{server.log_tail()}{others}"
            )
        result: Result = json.loads(proc.stdout)
        return result

    def start(self, kind: ServerKind, cpus: set[int] | None) -> ServerProcess:
        return ServerProcess(kind, cpus, self.log_dir)

    def redis(self) -> RedisProcess:
        """A ``redis-server`` of this run's own, on the servers' CPUs (server-side cost)."""
        return RedisProcess(self.server_cpus, self.log_dir)


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
    return alternate(rounds, {srv.kind.name: functools.partial(job, srv) for srv in servers}, key)


def alternate(rounds: int, jobs: dict[str, Callable[[], Result]], key: str) -> Result:
    """Run each job ``rounds`` times interleaved (a, b, a, b, ...); rounds and median by name."""
    runs: dict[str, list[Result]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            runs[name].append(job())
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

    wsserver (on uvloop, its default), the plain-Tornado baseline, and the
    same-loop pairs (:meth:`Bench.loop_variants`); with FastAPI and
    ``uvicorn[standard]`` installed, also FastAPI under uvicorn.
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

    ws_asyncio_kind, base_uv_kind = bench.loop_variants()
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(bench.start(kind, bench.server_cpus))
                   for kind in (ws_kind, base_kind, ws_asyncio_kind, base_uv_kind)]  # fmt: skip
        if skipped is None:
            servers.append(stack.enter_context(bench.start(uvicorn_kind(), bench.server_cpus)))
        node = bench.node_ws()
        if isinstance(node, ServerKind):
            servers.append(stack.enter_context(bench.start(node, bench.server_cpus)))
        result = interleaved(bench, servers, p.echo_rounds, job, "messages_per_s")
        if skipped is not None:
            result["uvicorn"] = {"skipped": skipped}
        if isinstance(node, str):
            result["node_ws"] = {"skipped": node}
    return result


def idle(bench: Bench) -> Result:
    """10,000 authenticated idle connections: connects/s and server RSS per connection.

    Every round starts fresh servers (memory must be read from a clean
    process); rounds alternate between the servers like the other scenarios.
    """
    node = bench.node_ws()
    nodes = [node] if isinstance(node, ServerKind) else []
    kinds = (*bench.kinds(), *bench.loop_variants(), *nodes)
    result = idle_rounds(bench, kinds)
    if isinstance(node, str):
        result["node_ws"] = {"skipped": node}
    result["note"] = (
        "RSS is the server process alone (VmRSS); wsserver's task-pool workers are "
        "separate processes, hold no connection state and are not counted"
    )
    return result


def idle_rounds(
    bench: Bench, kinds: Sequence[ServerKind], redis: RedisProcess | None = None
) -> Result:
    """The idle job against a fresh server of each kind, rounds interleaved; median by kind.

    With ``redis``, kinds whose argv names its URL have its CPU measured too.
    """
    p = bench.params
    runs: dict[str, list[Result]] = {kind.name: [] for kind in kinds}
    for _ in range(p.idle_rounds):
        for kind in kinds:
            via_redis = redis is not None and redis.url in kind.argv
            with bench.start(kind, bench.server_cpus) as srv:
                run = bench.loadgen(
                    "idle", srv, also=[redis] if redis is not None and via_redis else [],
                    connections=p.idle_connections,
                    warmup_connections=p.idle_warmup_connections,
                    server_pid=srv.pid,
                    redis_pid=redis.pid if redis is not None and via_redis else None,
                )  # fmt: skip
            runs[kind.name].append(run)
    return {
        name: {"median": median_round(rounds, "connects_per_s"), "rounds": rounds}
        for name, rounds in runs.items()
    }


def fanout(bench: Bench) -> Result:
    """1,000 members in one room, N publishes; deliveries/s, every message to every member.

    Node's ``ws`` takes part when it can run. Then one publish in flight into
    ``fanout_single_members`` (500) members: wsserver, plain Tornado and Node's ``ws``.
    """
    p = bench.params

    def job(srv: ServerProcess, window: int = p.fanout_window) -> Result:
        return bench.loadgen(
            "fanout", srv,
            members=p.fanout_members, publishes=p.fanout_publishes, window=window,
            timeout=120, server_pid=srv.pid,
        )  # fmt: skip

    def one_in_flight(srv: ServerProcess) -> Result:
        return bench.loadgen(
            "fanout", srv,
            members=p.fanout_single_members, publishes=p.fanout_publishes, window=1,
            timeout=120, server_pid=srv.pid,
        )  # fmt: skip

    node = bench.node_ws()
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(bench.start(kind, bench.server_cpus))
                   for kind in (*bench.kinds(), *bench.loop_variants())]  # fmt: skip
        if isinstance(node, ServerKind):
            servers.append(stack.enter_context(bench.start(node, bench.server_cpus)))
        result = interleaved(bench, servers, p.fanout_rounds, job, "deliveries_per_s")
        if isinstance(node, str):
            result["node_ws"] = {"skipped": node}
        # One publish at a time (issue 21: into 500 members): each reaches a
        # member alone, so no two frames share a write; what the per-step write
        # batching is worth, by difference, and the row against Node's ``ws``.
        single = servers[:2] + servers[4:]
        result["one_in_flight"] = interleaved(
            bench, single, p.fanout_rounds, one_in_flight, "deliveries_per_s"
        )
        # Issue 19: the publisher sends all of its messages back to back (no
        # window): past the session's queue the server stops reading it (TCP
        # back-pressure) instead of closing it, and every message still arrives.
        result["no_window"] = alternate(p.fanout_rounds, {
            "no_window": lambda: job(servers[0], window=p.fanout_publishes),
            "windowed": lambda: job(servers[0]),
        }, "deliveries_per_s")  # fmt: skip
        return result


def loop(bench: Bench) -> Result:
    """Ping latency with the task pool idle, saturated, and (baseline) the task inline.

    Neither server is pinned here: wsserver's pool workers (one per CPU by
    default) must be free to use every core, as they would in production, and
    the question is whether the event loop still gets its turn among them.
    """
    p = bench.params
    task = {"name": "primes", "args": {"limit": p.loop_primes_limit}}
    common: dict[str, Any] = {
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


# --- cluster and history scenarios (wsserver against itself) -------------------


def broker_kinds(bench: Bench, redis_url: str) -> tuple[ServerKind, ServerKind]:
    """wsserver with the memory broker and with ``--broker REDIS_URL``, the same otherwise."""
    plain = wsserver_kind(bench.secret)
    return (
        renamed(plain, "wsserver_memory"),
        renamed(plain, "wsserver_redis", ["--broker", redis_url]),
    )


def redis_fanout(bench: Bench) -> Result:
    """The ``fanout`` scenario on one node: through Redis against the memory broker.

    A publish through Redis should cost one round trip, not one per member:
    deliveries/s and server CPU µs per delivery should stay close. Redis runs
    on the servers' CPU; its own CPU per delivery is reported apart.
    """
    p = bench.params
    with bench.redis() as redis:
        memory_kind, redis_kind = broker_kinds(bench, redis.url)
        with bench.start(memory_kind, bench.server_cpus) as mem, bench.start(
            redis_kind, bench.server_cpus
        ) as red:

            def job(srv: ServerProcess) -> Result:
                via_redis = srv is red
                return bench.loadgen(
                    "fanout", srv, also=[redis] if via_redis else [],
                    members=p.fanout_members, publishes=p.fanout_publishes,
                    window=p.fanout_window, timeout=120, server_pid=srv.pid,
                    redis_pid=redis.pid if via_redis else None,
                )  # fmt: skip

            return interleaved(bench, [red, mem], p.fanout_rounds, job, "deliveries_per_s")


def redis_echo(bench: Bench) -> Result:
    """The ``echo`` scenario with the Redis broker against the memory broker.

    No Redis round trip is made per echo (the contract), so the two should
    be level; Redis's CPU over the interval shows that it stayed idle.
    """
    p = bench.params
    with bench.redis() as redis:
        memory_kind, redis_kind = broker_kinds(bench, redis.url)
        with bench.start(memory_kind, bench.server_cpus) as mem, bench.start(
            redis_kind, bench.server_cpus
        ) as red:

            def job(srv: ServerProcess) -> Result:
                return bench.loadgen(
                    "echo", srv, also=[redis] if srv is red else [],
                    connections=p.echo_connections, warmup=p.echo_warmup,
                    duration=p.echo_duration, server_pid=srv.pid,
                    redis_pid=redis.pid if srv is red else None,
                )  # fmt: skip

            return interleaved(bench, [red, mem], p.echo_rounds, job, "messages_per_s")


def two_nodes(bench: Bench) -> Result:
    """Fan-out across two wsserver nodes sharing one Redis, against one node.

    ``two_nodes``: the members are split evenly across node 1 and node 2, the
    publisher is on node 1. ``one_node``: every member on node 1 (node 2 sits
    idle, with no member, so is not subscribed). Server CPU per delivery is
    the sum of both nodes' CPU time. All of it shares the servers' CPU.
    """
    p = bench.params
    with bench.redis() as redis:
        plain = wsserver_kind(bench.secret)
        kinds = [
            renamed(plain, f"wsserver_node{n}", ["--broker", redis.url, "--node-name", f"node{n}"])
            for n in (1, 2)
        ]
        with bench.start(kinds[0], bench.server_cpus) as node1, bench.start(
            kinds[1], bench.server_cpus
        ) as node2:

            def job(urls: list[str]) -> Result:
                return bench.loadgen(
                    "fanout", node1, also=[node2, redis], urls=urls,
                    members=p.fanout_members, publishes=p.fanout_publishes,
                    window=p.fanout_window, timeout=120,
                    server_pids=[node1.pid, node2.pid], redis_pid=redis.pid,
                )  # fmt: skip

            return alternate(
                p.fanout_rounds,
                {
                    "two_nodes": lambda: job([node1.url, node2.url]),
                    "one_node": lambda: job([node1.url]),
                },
                "deliveries_per_s",
            )


#: Room policy for the history scenario: rooms policy comes only from a config
#: file. The loadgen's tokens grant every room, so ``join``/``publish`` stay
#: "token"; ``hist:`` rooms keep 100 messages, ``recover:`` rooms the 300 recovered.
HISTORY_CONFIG = """\
# Written by python -m bench for the history scenario.
[rooms]
join = "token"
publish = "token"

[rooms.namespaces.hist]
history_size = 100

[rooms.namespaces.recover]
history_size = {recovery}
"""


def history(bench: Bench) -> Result:
    """Fan-out with history on (room ``hist:bench``) against off (``bench``), memory broker.

    Both servers run the same config file; only the room differs. Then, on
    the history server, the time a fresh join with ``since`` takes to
    recover ``recovery_messages`` messages (``recover:bench``), several
    times, against a plain join of the same room.
    """
    p = bench.params
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        config = Path(tmp) / "rooms.toml"
        config.write_text(HISTORY_CONFIG.format(recovery=p.recovery_messages))
        plain = wsserver_kind(bench.secret)
        on_kind = renamed(plain, "wsserver_history", ["--config", str(config)])
        off_kind = renamed(plain, "wsserver_nohistory", ["--config", str(config)])
        with bench.start(on_kind, bench.server_cpus) as on, bench.start(
            off_kind, bench.server_cpus
        ) as off:

            def job(srv: ServerProcess) -> Result:
                return bench.loadgen(
                    "fanout", srv, room="hist:bench" if srv is on else "bench",
                    members=p.fanout_members, publishes=p.fanout_publishes,
                    window=p.fanout_window, timeout=120, server_pid=srv.pid,
                )  # fmt: skip

            result = interleaved(bench, [on, off], p.fanout_rounds, job, "deliveries_per_s")

            def churned(rate: float) -> Result:
                return bench.loadgen(
                    "fanout", on, room="hist:churn", churn=rate,
                    members=p.fanout_members, publishes=p.fanout_publishes,
                    window=p.fanout_window, timeout=120, server_pid=on.pid,
                )  # fmt: skip

            # Issue 19: members join and leave at 20/s beside the fan-out; each
            # join's history read races the live messages, and costs a read.
            result["churn"] = alternate(p.fanout_rounds, {
                "churn": lambda: churned(p.churn_rate),
                "no_churn": lambda: churned(0),
            }, "deliveries_per_s")  # fmt: skip
            result["recovery"] = bench.loadgen(
                "recover", on, room="recover:bench", messages=p.recovery_messages,
                window=p.fanout_window, joins=p.recovery_joins,
            )  # fmt: skip
    return result


def connect_proxy(bench: Bench) -> Result:
    """Connects/s and server CPU per connect: the connect proxy against JWTs.

    ``wsserver_jwt`` verifies an HS256 token per connection (as ``idle``);
    ``wsserver_proxy`` gets no token, so it POSTs each handshake's cookie to a
    local backend that answers at once (:mod:`bench.proxy_backend`), over
    aiohttp's keep-alive pool: the price of one round trip per connect. The
    backend runs on the generator's CPU (it is the application's cost, not
    the server's); its CPU per connect is reported apart. Fresh servers each
    round, rounds alternating.
    """
    p = bench.params
    jwt_kind = renamed(wsserver_kind(bench.secret), "wsserver_jwt")
    with bench.start(proxy_backend_kind(), bench.generator_cpus) as backend:
        proxy_kind = dataclasses.replace(
            renamed(wsserver_kind(bench.secret), "wsserver_proxy",
                    ["--proxy-connect-url", f"http://127.0.0.1:{backend.port}/connect"]),
            jwt_user=None,
        )  # fmt: skip
        runs: dict[str, list[Result]] = {jwt_kind.name: [], proxy_kind.name: []}
        for _ in range(p.proxy_rounds):
            for kind in (jwt_kind, proxy_kind):
                with bench.start(kind, bench.server_cpus) as srv:
                    backend_before = cpu_seconds(backend.pid)
                    run = bench.loadgen(
                        "idle", srv, also=[backend],
                        connections=p.proxy_connections,
                        warmup_connections=p.idle_warmup_connections,
                        server_pid=srv.pid,
                        extra_headers={"Cookie": "session=bench-session-cookie"},
                    )  # fmt: skip
                    backend_cpu = cpu_seconds(backend.pid) - backend_before
                if kind is proxy_kind:
                    # Warm-up connects went through the backend too.
                    calls = p.proxy_connections + p.idle_warmup_connections
                    run["backend_cpu_us_per_connect"] = 1e6 * backend_cpu / calls
                runs[kind.name].append(run)
    result: Result = {
        name: {"median": median_round(rounds, "connects_per_s"), "rounds": rounds}
        for name, rounds in runs.items()
    }
    jwt_rate = result[jwt_kind.name]["median"]["connects_per_s"]
    proxy_rate = result[proxy_kind.name]["median"]["connects_per_s"]
    result["proxy_to_jwt_connects"] = proxy_rate / jwt_rate if jwt_rate else None
    return result


def drain(bench: Bench) -> Result:
    """A rolling deploy: clients of a node that stops reconnect to the next node.

    ``all_at_once``: SIGTERM with the default drain (every connection gets
    1001 at once; clients wait a random delay under 1 s, as wsclient.js
    does). ``paced``: the same with ``--drain-rate`` (1012 at that
    pace; clients wait a random delay in the first backoff window, 0.5 s).
    The figure is the peak of reconnects per 100 ms on the next node.
    """
    p = bench.params
    plain = wsserver_kind(bench.secret)
    variants = {
        "all_at_once": [],
        "paced": ["--drain-rate", str(p.drain_rate)],
    }
    result: Result = {"drain_rate_per_s": p.drain_rate}
    for name, flags in variants.items():
        stopping = renamed(plain, "wsserver_draining", ["--drain-timeout", "60", *flags])
        with bench.start(renamed(plain, "wsserver_next"), bench.server_cpus) as after:
            before = bench.start(stopping, bench.server_cpus)
            try:
                run = bench.loadgen(
                    "drain", after, draining_url=before.url, draining_pid=before.pid,
                    connections=p.drain_connections, timeout=60,
                )  # fmt: skip
            finally:
                run_exit = before.stop()
            run["draining_exit_code"] = run_exit
        result[name] = run
    return result


def streaming(bench: Bench) -> Result:
    """HTTP streaming (issue 22): fan-out to streaming members against WebSocket members.

    One wsserver; ``stream_members`` members over HTTP streaming (``GET /sse``,
    joined by ``POST /sse/send``), then as many over WebSockets, interleaved
    rounds; each run has the same WebSocket publisher. Then server RSS per idle
    stream against per idle WebSocket, each on a fresh server.
    """
    p = bench.params
    kind = wsserver_kind(bench.secret)
    with bench.start(kind, bench.server_cpus) as srv:

        def job(transport: str) -> Result:
            return bench.loadgen(
                "stream_fanout", srv, transport=transport, members=p.stream_members,
                publishes=p.stream_publishes, window=p.fanout_window, timeout=120,
                server_pid=srv.pid,
            )  # fmt: skip

        result = alternate(
            p.fanout_rounds,
            {"sse": lambda: job("sse"), "websocket": lambda: job("websocket")},
            "deliveries_per_s",
        )
    idle_runs: Result = {}
    for transport, scenario in (("sse", "stream_idle"), ("websocket", "idle")):
        with bench.start(kind, bench.server_cpus) as srv:
            idle_runs[transport] = bench.loadgen(
                scenario, srv, connections=p.stream_idle_connections,
                warmup_connections=p.idle_warmup_connections, server_pid=srv.pid,
            )  # fmt: skip
    result["idle"] = idle_runs
    return result


def redis_idle(bench: Bench) -> Result:
    """The ``idle`` scenario with the Redis broker against the memory broker.

    A connect with Redis counts the user's connections there (the per-user
    cap across nodes): issue 21's target is 0.8x the memory broker's connect
    rate. Redis runs on the servers' CPU; its CPU per connect is apart.
    """
    with bench.redis() as redis:
        memory_kind, redis_kind = broker_kinds(bench, redis.url)
        return idle_rounds(bench, [redis_kind, memory_kind], redis)


def wss_echo(bench: Bench) -> Result:
    """The ``echo`` scenario over ``wss://`` against ``ws://``, the same wsserver otherwise.

    The certificate is made now (:mod:`bench.tlscert`, ECDSA P-256, self-signed
    for 127.0.0.1) and the clients verify it. The handshakes are not timed.
    """
    p = bench.params
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        pair = make_cert(Path(tmp))
        plain = wsserver_kind(bench.secret)
        tls = dataclasses.replace(
            renamed(plain, "wsserver_wss",
                    ["--certfile", str(pair.certfile), "--keyfile", str(pair.keyfile)]),
            cafile=str(pair.certfile),
        )  # fmt: skip
        with bench.start(plain, bench.server_cpus) as ws, bench.start(
            tls, bench.server_cpus
        ) as wss:

            def job(srv: ServerProcess) -> Result:
                return bench.loadgen(
                    "echo", srv,
                    connections=p.echo_connections, warmup=p.echo_warmup,
                    duration=p.echo_duration, server_pid=srv.pid,
                )  # fmt: skip

            return interleaved(bench, [wss, ws], p.echo_rounds, job, "messages_per_s")


def compression(bench: Bench) -> Result:
    """permessage-deflate: bytes on the wire, fan-out CPU with it on and off, a size sweep.

    Skipped, with the reason, when wsserver does not accept a browser's offer
    (no ``Sec-WebSocket-Extensions`` in the 101). Otherwise, with
    :mod:`bench.wire`'s raw client (picows cannot inflate):

    * ``wire_bytes``: a 1-2 kB dashboard update and a 150-byte chat line
      published to a member that offers deflate and one that does not, on
      the default server (``--compression-threshold`` as shipped) and on one
      with threshold 0 (what deflate would give the chat line);
    * ``fanout``: ``compression_members`` deflating members, 1.5 kB updates,
      against ``--compression on`` and ``--compression off``, rounds interleaved;
    * ``sweep``: per size in ``sweep_sizes``, one member publishing into its
      own room one message at a time, on threshold 0 (compressed) and on
      ``--compression off``: wire bytes and server CPU per message.
    """
    p = bench.params
    plain = wsserver_kind(bench.secret)
    with bench.start(plain, bench.server_cpus) as srv:
        probe = bench.loadgen("deflate_probe", srv)
    if not probe["negotiated"]:
        return {
            "skipped": "the server does not negotiate permessage-deflate (the 101 to "
                       f"{probe['offer']!r} has no Sec-WebSocket-Extensions)",
            "probe": probe,
        }  # fmt: skip
    result: Result = {"probe": probe}
    dashboard, chat = payloads.dashboard_update(0), payloads.chat_line(1)
    named = [{"name": "dashboard", "data": dashboard}, {"name": "chat", "data": chat}]
    off = renamed(plain, "wsserver_compression_off", ["--compression", "off"])
    zero = renamed(plain, "wsserver_threshold0", ["--compression-threshold", "0"])
    with contextlib.ExitStack() as stack:
        on_srv, off_srv, zero_srv = (stack.enter_context(bench.start(kind, bench.server_cpus))
                                     for kind in (plain, off, zero))  # fmt: skip
        result["wire_bytes"] = {
            "default_threshold": bench.loadgen("wire_bytes", on_srv, payloads=named),
            "threshold_0": bench.loadgen("wire_bytes", zero_srv, payloads=named),
        }

        def fan(srv: ServerProcess) -> Result:
            return bench.loadgen(
                "deflate_fanout", srv,
                members=p.compression_members, publishes=p.compression_publishes,
                window=p.fanout_window, size=1500, timeout=120, server_pid=srv.pid,
            )  # fmt: skip

        result["fanout"] = interleaved(bench, [on_srv, off_srv], p.fanout_rounds, fan,
                                       "deliveries_per_s")  # fmt: skip

        def sweep(srv: ServerProcess, offer: bool) -> Result:
            return bench.loadgen(
                "deflate_sweep", srv, sizes=list(p.sweep_sizes), messages=p.sweep_messages,
                offer_deflate=offer, server_pid=srv.pid,
            )  # fmt: skip

        result["sweep"] = {
            "compressed": sweep(zero_srv, True),
            "uncompressed": sweep(off_srv, True),
        }
    return result


SCENARIOS: dict[str, Callable[[Bench], Result]] = {
    "echo": echo,
    "idle": idle,
    "fanout": fanout,
    "loop": loop,
    "redis_fanout": redis_fanout,
    "redis_echo": redis_echo,
    "two_nodes": two_nodes,
    "history": history,
    "connect_proxy": connect_proxy,
    "drain": drain,
    "redis_idle": redis_idle,
    "wss_echo": wss_echo,
    "compression": compression,
    "streaming": streaming,
}

#: Scenarios that run only when named with ``--scenario`` (minutes at full size).
EXTRA_SCENARIOS: dict[str, Callable[[Bench], Result]] = {"c100k": c100k.run}


def params_dict(params: Params) -> dict[str, Any]:
    return asdict(params)
