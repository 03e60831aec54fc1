"""Where a server's time goes under one scenario: py-spy on the server process.

``python -m bench.profiling --server baseline --scenario echo`` starts the
server pinned like the benchmark does, drives it with the load generator, and
samples it with ``py-spy record`` (``pip install py-spy``) meanwhile. It keeps
the raw stacks (``--output``, for flame graphs) and prints the functions with
the most samples, inclusive and self, with line numbers folded away.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.runner import FULL, Bench, split_cpus
from bench.servers import ServerKind, baseline_kind, new_secret, uvicorn_kind, wsserver_kind

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


def render(summary: dict[str, Any], top: int) -> str:
    total = summary["samples"] or 1
    out = [f"{summary['samples']} samples of the busy main thread"]
    for title in ("inclusive", "self"):
        out.append(f"\ntop {top} by {title} time:")
        for name, count in summary[title].most_common(top):
            out.append(f"  {100 * count / total:5.1f}%  {name}")
    return "\n".join(out)


def kind_named(name: str, secret: str) -> ServerKind:
    return {"wsserver": wsserver_kind(secret), "baseline": baseline_kind(),
            "uvicorn": uvicorn_kind()}[name]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profiling", description=__doc__)
    parser.add_argument("--server", choices=("wsserver", "baseline", "uvicorn"), required=True)
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
    raw_path = args.output / f"profile-{args.server}-{args.scenario}.txt"
    p = FULL
    jobs: dict[str, dict[str, Any]] = {
        "echo": {"connections": p.echo_connections, "warmup": 0.5, "duration": args.seconds},
        "idle": {"connections": p.idle_connections, "warmup_connections": 10},
        "fanout": {"members": p.fanout_members, "publishes": p.fanout_publishes,
                   "window": p.fanout_window, "timeout": 120},
    }  # fmt: skip
    with bench.start(kind_named(args.server, secret), server_cpus) as srv:
        job = {**jobs[args.scenario], "server_pid": srv.pid}
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
    if not raw_path.exists():
        print(f"py-spy wrote nothing: {spy_err}", file=sys.stderr)
        return 1
    print({k: v for k, v in result.items() if not isinstance(v, dict)})
    print(render(summarize(raw_path.read_text().splitlines()), args.top))
    print(f"\nraw stacks: {raw_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
