"""The 100,000-connection scenario (``python -m bench --scenario c100k``; not in the default run).

One process may hold at most 20,000 descriptors on these machines (a hard
``RLIMIT_NOFILE`` that root cannot raise), so 100,000 connections need
several server processes and several client processes:

* **node**: ``c100k_node_connections`` (19,000) idle authenticated
  connections on one wsserver node, from one load-generator process: connect
  rate, server CPU per connect, RSS per connection (the ``idle`` job).
* **machine**: ``c100k_machine_connections`` (100,000) on one machine:
  wsserver ``--workers c100k_workers`` (6) with a Redis broker, the clients
  split over ``c100k_generators`` (6) load-generator processes, each under
  the descriptor limit and each with its own slice of the source addresses
  127.0.0.2-127.0.0.254 (every address has its own ephemeral port range).
  Every connection waits for its welcome; ``c100k_room_members`` (10,000) of
  them, spread over the generators, join one room. Reported: the connect
  rate (all connections over the time from the first generator's start to
  the last one's end), the workers' CPU per connect, RSS per connection (the
  growth of the sum of the workers' RSS, task-pool processes not counted),
  descriptors per worker (how evenly the kernel spread the accepts), and
  then ``c100k_publishes`` publishes through the server API
  (``POST /api/publish``) into the room, each of which every member must
  receive: deliveries are counted, not assumed.

:func:`kernel_facts` reads what the kernel allows and :func:`kernel_problems`
says what would stop a run of a given size (ephemeral ports per source
address, ``somaxconn`` against the listen backlog, conntrack, file limits);
both are in the result. Nothing here changes a sysctl: docs/performance.md
says which to set, and what each is for.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from bench.loadgen import CONNECT_CONCURRENCY, split
from bench.meters import cpu_seconds, read_rss_kib
from bench.servers import ServerProcess, renamed, wsserver_kind

if TYPE_CHECKING:
    from bench.runner import Bench

Result = dict[str, Any]

#: 127.0.0.2 ... 127.0.0.254, split between the generators.
SOURCE_ADDRESSES = tuple(f"127.0.0.{n}" for n in range(2, 255))
#: wsserver's listen backlog (wsserver/edge/server.py); the kernel caps it at somaxconn.
LISTEN_BACKLOG = 1024
#: Descriptors a process needs beside its connections (listeners, pipes, epoll, files).
FD_HEADROOM = 200

SYSCTLS = {
    "ip_local_port_range": "net/ipv4/ip_local_port_range",
    "somaxconn": "net/core/somaxconn",
    "tcp_max_syn_backlog": "net/ipv4/tcp_max_syn_backlog",
    "tcp_tw_reuse": "net/ipv4/tcp_tw_reuse",
    "tcp_fin_timeout": "net/ipv4/tcp_fin_timeout",
    "tcp_mem": "net/ipv4/tcp_mem",
    "file_max": "fs/file-max",
    "nr_open": "fs/nr_open",
    "nf_conntrack_max": "net/netfilter/nf_conntrack_max",
}


def kernel_facts() -> Result:
    """The sysctls and limits that decide how many connections fit (None: not present)."""
    facts: Result = {}
    for name, path in SYSCTLS.items():
        try:
            facts[name] = Path("/proc/sys", path).read_text().split()
        except OSError:
            facts[name] = None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    facts["rlimit_nofile"] = [soft, hard]
    return facts


def _int(facts: Result, name: str, index: int = 0) -> int | None:
    value = facts.get(name)
    return int(value[index]) if value else None


def kernel_problems(
    facts: Result, connections: int, per_process: int, addresses: int, server_processes: int
) -> list[str]:
    """What in ``facts`` stops ``connections`` from fitting, one actionable line each.

    ``per_process``: the most connections one process (client or server) holds;
    ``addresses``: the client source addresses they are spread over.
    """
    problems: list[str] = []
    hard = facts["rlimit_nofile"][1]
    if hard < per_process + FD_HEADROOM:
        problems.append(
            f"RLIMIT_NOFILE hard limit {hard} < {per_process} connections per process + "
            f"{FD_HEADROOM}: use more processes (server --workers, more generators)"
        )
    ports = facts.get("ip_local_port_range")
    if ports:
        per_address = int(ports[1]) - int(ports[0]) + 1
        # TIME_WAIT leftovers of earlier runs hold ports too: keep half free.
        if per_address * addresses < 2 * connections:
            problems.append(
                f"{per_address} ephemeral ports x {addresses} source addresses < 2 x "
                f"{connections}: spread over more addresses, or widen "
                "net.ipv4.ip_local_port_range"
            )
    somaxconn = _int(facts, "somaxconn")
    if somaxconn is not None and somaxconn < LISTEN_BACKLOG:
        problems.append(
            f"net.core.somaxconn {somaxconn} < wsserver's listen backlog {LISTEN_BACKLOG}: "
            f"sysctl -w net.core.somaxconn={LISTEN_BACKLOG} (else SYN retries skew connects/s)"
        )
    syn = _int(facts, "tcp_max_syn_backlog")
    if syn is not None and syn < CONNECT_CONCURRENCY * server_processes:
        problems.append(
            f"net.ipv4.tcp_max_syn_backlog {syn} < the handshakes in flight: raise it"
        )
    conntrack = _int(facts, "nf_conntrack_max")
    if conntrack is not None and conntrack < 2 * connections:
        problems.append(
            f"net.netfilter.nf_conntrack_max {conntrack} < 2 x {connections} (connections "
            "and their TIME_WAIT): raise it, or new connections are dropped"
        )
    file_max = _int(facts, "file_max")
    if file_max is not None and file_max < 2 * connections + 10_000:
        problems.append(
            f"fs.file-max {file_max} < 2 x {connections} (both ends on this machine): raise it"
        )
    return problems


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the workers of a ``--workers`` supervisor)."""
    children: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry))
    return sorted(children)


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def address_slices(count: int, addresses: Sequence[str] = SOURCE_ADDRESSES) -> list[list[str]]:
    """``addresses`` dealt into ``count`` disjoint, nearly equal slices."""
    return [list(addresses[i::count]) for i in range(count)]


def single_node(bench: Bench) -> Result:
    """``c100k_node_connections`` idle authenticated connections on one node."""
    p = bench.params
    with bench.start(wsserver_kind(bench.secret), bench.server_cpus) as srv:
        return bench.loadgen(
            "idle", srv,
            connections=p.c100k_node_connections, warmup_connections=50, server_pid=srv.pid,
            # 19,000 connections and the warm-up's TIME_WAIT: 8 addresses, ports to spare.
            source_addresses=list(SOURCE_ADDRESSES[-8:]),
        )  # fmt: skip


class Generator:
    """One ``hold`` load-generator process, its lines read by a thread."""

    def __init__(self, bench: Bench, url: str, number: int, job: Result) -> None:
        self.number = number
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "BENCH_JWT_SECRET": bench.secret},
        )  # fmt: skip
        job = {**job, "scenario": "hold", "url": url, "jwt_user": f"bench-g{number}",
               "cpus": sorted(bench.generator_cpus or ())}  # fmt: skip
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self.lines: list[Result] = []
        self.stderr = ""
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout: IO[str] | None = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            if line.strip():
                self.lines.append(json.loads(line))
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float) -> Result:
        if not self._ready.wait(timeout) or not self.lines:
            raise RuntimeError(f"generator {self.number} not ready: {self.error()}")
        return self.lines[0]

    def command(self, msg: Result) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.close()

    def result(self, timeout: float) -> Result:
        self._reader.join(timeout)
        self.proc.wait(timeout=30)
        if self.proc.returncode != 0 or len(self.lines) < 2:
            raise RuntimeError(f"generator {self.number} failed: {self.error()}")
        return self.lines[-1]

    def error(self) -> str:
        """Why it failed: its exit and the tail of its stderr (killed first if still running)."""
        running = self.proc.poll() is None
        self.kill()
        if self.proc.stderr is not None and not self.stderr:
            self.stderr = self.proc.stderr.read()
        how = "killed while still waiting" if running else f"exit {self.proc.returncode}"
        return f"{how}: {self.stderr[-2000:]}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def api_publish(base: str, key: str, room: str, data: Any) -> Result:
    """``POST /api/publish`` with the server API key; its JSON answer."""
    request = urllib.request.Request(
        f"{base}/api/publish", method="POST",
        data=json.dumps({"room": room, "data": data}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"apikey {key}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as answer:
        out: Result = json.load(answer)
        return out


def one_machine(bench: Bench) -> Result:
    """``c100k_machine_connections`` over ``c100k_workers`` workers sharing Redis; a publish."""
    p = bench.params
    total, room = p.c100k_machine_connections, "c100k"
    # One ready timeout for all: at 200 connects/s at worst, and the joins.
    timeout = 120 + total / 200
    with bench.redis() as redis, tempfile.TemporaryDirectory(prefix="bench-c100k-") as tmp:
        key = secrets.token_urlsafe(48)
        key_file = Path(tmp) / "api-key"
        key_file.touch(mode=0o600)
        key_file.write_text(key)
        kind = renamed(wsserver_kind(bench.secret), "wsserver_workers", [
            "--broker", redis.url, "--workers", str(p.c100k_workers),
            "--api-key-file", str(key_file),
            # One task-pool process per worker: the pool holds no connection state.
            "--task-workers", "1",
        ])  # fmt: skip
        with bench.start(kind, bench.server_cpus) as srv:
            workers = wait_workers(srv, p.c100k_workers)
            rss_before = sum(read_rss_kib(pid) for pid in workers)
            cpu_before = sum(cpu_seconds(pid) for pid in workers)
            redis_cpu_before = cpu_seconds(redis.pid)
            counts = split(total, p.c100k_generators)
            members = split(p.c100k_room_members, p.c100k_generators)
            slices = address_slices(p.c100k_generators)
            generators: list[Generator] = []
            try:
                for n in range(p.c100k_generators):
                    generators.append(Generator(bench, srv.url, n, {
                        "connections": counts[n], "members": members[n], "room": room,
                        "source_addresses": slices[n], "timeout": timeout,
                    }))  # fmt: skip
                ready = [g.wait_ready(timeout) for g in generators]
                srv.check_alive()
                connected = sum(r["connections"] for r in ready)
                wall = max(r["finished"] for r in ready) - min(r["started"] for r in ready)
                cpu = sum(cpu_seconds(pid) for pid in workers) - cpu_before
                redis_cpu = cpu_seconds(redis.pid) - redis_cpu_before
                rss_after = sum(read_rss_kib(pid) for pid in workers)
                fds = {str(pid): open_fds(pid) for pid in workers}
                base = srv.url.replace("ws://", "http://").removesuffix("/ws")
                published_at = time.perf_counter()
                answers = [api_publish(base, key, room, {"seq": n})
                           for n in range(p.c100k_publishes)]  # fmt: skip
                publish_s = time.perf_counter() - published_at
                for g in generators:
                    g.command({"expect": p.c100k_publishes})
                results = [g.result(timeout) for g in generators]
            finally:
                for g in generators:
                    g.kill()
            srv.check_alive()
    expected = sum(r["expected"] for r in results)
    delivered = sum(r["delivered"] for r in results)
    return {
        "workers": p.c100k_workers,
        "worker_pids": workers,
        "generators": p.c100k_generators,
        "connections": connected,
        "connect_seconds": wall,
        "connects_per_s": connected / wall if wall else None,
        "server_cpu_us_per_connect": 1e6 * cpu / connected if connected else None,
        "redis_cpu_us_per_connect": 1e6 * redis_cpu / connected if connected else None,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "kib_per_connection": (rss_after - rss_before) / connected if connected else None,
        "open_fds_per_worker": fds,
        "handshake_p99_ms_per_generator": [r["handshake"]["p99_ms"] for r in ready],
        "generator_max_rss_kib": [r["generator_max_rss_kib"] for r in ready],
        "room_members": sum(r["members"] for r in results),
        "join_retries": sum(r["join_retries"] for r in results),
        "publishes": p.c100k_publishes,
        "api_answers": answers,
        "publish_seconds": publish_s,
        "expected": expected,
        "delivered": delivered,
        "all_delivered": delivered == expected
        and all(r["members_complete"] == r["members"] for r in results),
        "last_delivery_seconds": max(r["delivery_seconds"] for r in results),
        "still_open": sum(r["still_open"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
        "close_codes": _merge([r["close_codes"] for r in results]),
    }


def wait_workers(srv: ServerProcess, count: int, timeout: float = 30.0) -> list[int]:
    """The ``count`` worker pids under the supervisor (started before /healthz answered)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = child_pids(srv.pid)
        if len(workers) >= count:
            return workers[:count] if len(workers) == count else _workers_only(workers, count)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(workers)} workers under pid {srv.pid}, expected {count}")
        # Across processes nothing can be awaited: poll /proc.
        time.sleep(0.1)


def _workers_only(pids: list[int], count: int) -> list[int]:
    """The supervisor's children that run wsserver (not a stray helper)."""
    workers = [pid for pid in pids if b"wsserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return workers[:count]


def _merge(counts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for one in counts:
        for code, n in one.items():
            out[code] = out.get(code, 0) + n
    return out


def run(bench: Bench) -> Result:
    """Both parts, with the kernel's limits checked first (and kept in the result)."""
    p = bench.params
    facts = kernel_facts()
    per_generator = max(split(p.c100k_machine_connections, p.c100k_generators))
    per_worker = -(-p.c100k_machine_connections // p.c100k_workers)
    problems = kernel_problems(
        facts, p.c100k_machine_connections,
        max(per_generator, per_worker, p.c100k_node_connections),
        len(SOURCE_ADDRESSES), p.c100k_workers,
    )  # fmt: skip
    result: Result = {"kernel": facts, "kernel_problems": problems}
    if any(problem.startswith("RLIMIT_NOFILE") for problem in problems):
        # Past the descriptor limit a process fails with EMFILE: no figure would mean anything.
        raise RuntimeError("; ".join(problems))
    result["node"] = single_node(bench)
    try:
        result["machine"] = one_machine(bench)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        # Keep the node's figures: the table shows the machine part as an error row.
        result["machine"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result
