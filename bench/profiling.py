"""Where a server's time goes under one scenario: py-spy on the server process.

``python -m bench.profiling --server baseline --scenario echo`` starts the
server pinned like the benchmark does, drives it with the load generator, and
samples it with ``py-spy record`` (``pip install py-spy``) meanwhile. It keeps
the raw stacks (``--output``, for flame graphs) and prints the functions with
the most samples, inclusive and self, with line numbers folded away.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.runner import FULL, Bench, split_cpus
from bench.servers import (
    RedisProcess,
    ServerKind,
    baseline_kind,
    new_secret,
    node_ws_available,
    node_ws_kind,
    renamed,
    uvicorn_kind,
    wsserver_kind,
)

_LINE = re.compile(r":\d+\)$")


def fold(frame: str) -> str:
    """``name (path/file.py:123)`` -> ``name (file.py)``: one entry per function."""
    frame = _LINE.sub(")", frame)
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')')).name})" if where else name


def summarize(raw_lines: Iterable[str]) -> dict[str, Any]:
    """Inclusive and self sample counts per function from py-spy's raw (collapsed) output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw_lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [fold(f) for f in stack.split(";")]
        # Skip the thread label py-spy puts first ("process 123:..." / "thread (0x...)").
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return {"samples": total, "inclusive": inclusive, "self": own}


def _split(frame: str) -> tuple[str, str]:
    """``name (path/file.py:123)`` -> (``name``, ``path/file.py``)."""
    name, _, where = _LINE.sub(")", frame).partition(" (")
    return name, where.rstrip(")")


def _pkg(*packages: str) -> Callable[[str, str], bool]:
    """Frames in these top-level packages (py-spy writes ``jwt/api_jwt.py``, ``/x/jwt/...``)."""
    return lambda name, path: any(
        path.startswith(pkg + "/") or f"/{pkg}/" in path for pkg in packages
    )


def _file(filename: str) -> Callable[[str, str], bool]:
    """Frames of wsserver's ``filename`` (``session.py``, ``edge/handlers.py``, ...)."""
    return lambda name, path: path.endswith("wsserver/" + filename)


def _files(*filenames: str) -> Callable[[str, str], bool]:
    return lambda name, path: any(path.endswith("wsserver/" + f) for f in filenames)


def _named(*names: str) -> Callable[[str, str], bool]:
    """Frames of functions or methods called so (``Class.method`` matches ``method``)."""
    return lambda name, path: name.rpartition(".")[2] in names


#: Phases of a connect, highest priority first: a sample belongs to the first
#: phase any frame of its stack is in (PyJWT called from the handler's checks
#: counts as PyJWT; Tornado's helpers called from the handler as the handler).
CONNECT_PHASES: tuple[tuple[str, Callable[[str, str], bool]], ...] = (
    ("closing (the job's closes, after the measured connects)",
     _named("on_close", "connection_lost", "_transport_gone", "_peer_closed",
            "user_disconnect", "_cut_after_flush", "_send_close", "_send_final",
            "close_received_frame")),
    ("PyJWT (jwt.decode and its key and claim checks)", _pkg("jwt")),
    ("the broker's user_connect", _named("user_connect")),
    # Command writes and reply reads resumed outside the user_connect frame
    # (py-spy shows a resumed coroutine from its own frame), heartbeats too.
    ("redis-py outside user_connect (command writes, replies, heartbeats)", _pkg("redis")),
    ("logging", lambda n, p: _pkg("logging")(n, p) or p.endswith("wsserver/logsafe.py")),
    ("metrics (prometheus_client)", _pkg("prometheus_client")),
    ("token checks around PyJWT (wsserver.auth)", _file("auth.py")),
    ("Session: created and opened (welcome, registry)", _file("session.py")),
    ("the 101 hand-over (fastpath.serve, FrameConnection)", _file("edge/fastpath.py")),
    ("handler checks (handshake.decide, WebSocketHandler.get: origin, admission, limits)",
     _files("edge/handlers.py", "handshake.py", "admission.py", "registry.py", "origin.py",
            "ratelimit.py", "netaddr.py", "services.py", "protocol.py", "edge/refusal.py")),
    ("the native path: the head peeked, read and parsed (edge/native.py, httphead.py)",
     _files("edge/native.py", "httphead.py")),
    ("accept (edge/listener.py); Tornado: HTTP parsing, request and handler setup",
     lambda n, p: _pkg("tornado")(n, p) or p.endswith("wsserver/edge/listener.py")),
    ("event loop and the rest (asyncio, uvloop, keepalive, monitor)", _pkg("asyncio", "uvloop")),
)  # fmt: skip
OTHER = "other"


def phases(raw_lines: Iterable[str]) -> Counter[str]:
    """Samples per connect phase (:data:`CONNECT_PHASES`) from py-spy's raw output."""
    counts: Counter[str] = Counter()
    for line in raw_lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_split(f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread "))]  # fmt: skip
        if not frames:
            continue
        phase = next((name for name, rule in CONNECT_PHASES
                      if any(rule(*frame) for frame in frames)), OTHER)  # fmt: skip
        counts[phase] += int(count_text)
    return counts


def render_phases(counts: Counter[str], cpu_us_per_connect: float | None) -> str:
    """The phases ranked, as a share of the connect samples and µs per connect.

    Closing samples are left out of the shares: the measured CPU per connect
    covers the connects only, the samples cover the job's closes too.
    """
    closing = CONNECT_PHASES[0][0]
    connect = sum(n for name, n in counts.items() if name != closing) or 1
    out = [f"connect phases ({connect} samples; {counts[closing]} more while closing, left out)"]
    for name, n in counts.most_common():
        if name == closing:
            continue
        us = f"{n / connect * cpu_us_per_connect:7.1f} µs" if cpu_us_per_connect else "     - µs"
        out.append(f"  {100 * n / connect:5.1f}%  {us}  {name}")
    return "\n".join(out)


def redis_commandstats(port: int) -> dict[str, int]:
    """Calls per command so far (``INFO commandstats``) of the Redis on ``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"INFO commandstats\r\n")
        data = b""
        while True:
            data += conn.recv(65536)
            header, _, body = data.partition(b"\r\n")
            if header.startswith(b"$") and len(body) >= int(header[1:]):
                break
    calls: dict[str, int] = {}
    for line in body.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.partition(":")
            stats = dict(field.split("=") for field in fields.split(","))
            calls[name.removeprefix("cmdstat_")] = int(stats["calls"])
    return calls


def commands_per_connect(
    before: dict[str, int], after: dict[str, int], connects: int
) -> dict[str, float]:
    """Redis commands per connect over the job, by command (the INFO calls themselves excluded)."""
    out: dict[str, float] = {}
    for name, calls in after.items():
        made = calls - before.get(name, 0) - (1 if name == "info" else 0)
        if made > 0:
            out[name] = round(made / connects, 3)
    return out


def render(summary: dict[str, Any], top: int) -> str:
    total = summary["samples"] or 1
    out = [f"{summary['samples']} samples of the busy main thread"]
    for title in ("inclusive", "self"):
        out.append(f"\ntop {top} by {title} time:")
        for name, count in summary[title].most_common(top):
            out.append(f"  {100 * count / total:5.1f}%  {name}")
    return "\n".join(out)


def kind_named(name: str, secret: str) -> ServerKind:
    if name == "node_ws" and (why := node_ws_available()) is not None:
        raise SystemExit(f"node_ws: {why}")
    kinds = {"wsserver": lambda: wsserver_kind(secret), "baseline": baseline_kind,
             "uvicorn": uvicorn_kind, "node_ws": node_ws_kind}  # fmt: skip
    return kinds[name]()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profiling", description=__doc__)
    parser.add_argument("--server", choices=("wsserver", "baseline", "uvicorn", "node_ws"),
                        required=True)
    parser.add_argument("--broker", choices=("memory", "redis"), default="memory",
                        help="wsserver: with a redis-server of the profile's own")
    parser.add_argument("--connections", type=int, default=None,
                        help="idle: connections (default: the full benchmark's 10,000)")
    parser.add_argument("--scenario", choices=("echo", "idle", "fanout"), default="echo")
    parser.add_argument("--seconds", type=float, default=8.0, help="echo: sampling time")
    parser.add_argument("--rate", type=int, default=400, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2

    server_cpus, generator_cpus = split_cpus()
    args.output.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    bench = Bench(FULL, secret, args.output / "logs", server_cpus, generator_cpus)
    bench.log_dir.mkdir(parents=True, exist_ok=True)
    raw_path = args.output / f"profile-{args.server}-{args.broker}-{args.scenario}.txt"
    p = FULL
    jobs: dict[str, dict[str, Any]] = {
        "echo": {"connections": p.echo_connections, "warmup": 0.5, "duration": args.seconds},
        "idle": {"connections": args.connections or p.idle_connections,
                 "warmup_connections": 10},
        "fanout": {"members": p.fanout_members, "publishes": p.fanout_publishes,
                   "window": p.fanout_window, "timeout": 120},
    }  # fmt: skip
    with contextlib.ExitStack() as stack:
        kind = kind_named(args.server, secret)
        if args.broker == "redis":
            redis = stack.enter_context(RedisProcess(server_cpus, bench.log_dir))
            kind = renamed(kind, f"{kind.name}_redis", ["--broker", redis.url])
        srv = stack.enter_context(bench.start(kind, server_cpus))
        job = {**jobs[args.scenario], "server_pid": srv.pid}
        commands_before = redis_commandstats(redis.port) if args.broker == "redis" else {}
        result: dict[str, Any] = {}
        load = threading.Thread(
            target=lambda: result.update(bench.loadgen(args.scenario, srv, **job))
        )
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(srv.pid), "--rate", str(args.rate),
             "--format", "raw", "--output", str(raw_path), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        load.start()
        load.join()
        # py-spy writes its file on SIGINT, like Ctrl-C at a terminal.
        spy.send_signal(2)
        _, spy_err = spy.communicate(timeout=60)
        commands_after = redis_commandstats(redis.port) if args.broker == "redis" else {}
    if not raw_path.exists():
        print(f"py-spy wrote nothing: {spy_err}", file=sys.stderr)
        return 1
    print({k: v for k, v in result.items() if not isinstance(v, dict)})
    lines = raw_path.read_text().splitlines()
    print(render(summarize(lines), args.top))
    if args.scenario == "idle":
        print()
        print(render_phases(phases(lines), result.get("server_cpu_us_per_unit")))
        if commands_after:
            # The whole job: the warm-up's and the closes' commands are in it too.
            total = job["connections"] + job["warmup_connections"]
            print("Redis commands per connection (connect and close, the whole job):",
                  commands_per_connect(commands_before, commands_after, total))
    print(f"\nraw stacks: {raw_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
