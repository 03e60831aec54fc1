"""``python -m bench``: run the scenarios, write the JSON result, print the table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.report import checks, checks_json, machine_info, table
from bench.runner import (
    EXTRA_SCENARIOS,
    FULL,
    SCENARIOS,
    SMOKE,
    Bench,
    Params,
    params_dict,
    split_cpus,
)
from bench.servers import ServerError, new_secret, raise_fd_limit

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "latest.json"
SERVER_NAMES = frozenset({
    "wsserver", "baseline", "baseline_uvloop", "uvicorn", "redis",
    "wsserver_memory", "wsserver_redis", "wsserver_node1", "wsserver_node2",
    "wsserver_history", "wsserver_nohistory", "wsserver_jwt", "wsserver_proxy", "proxy_backend",
    "wsserver_draining", "wsserver_next", "wsserver_asyncio", "node_ws", "wsserver_wss",
    "wsserver_compression_off", "wsserver_threshold0", "wsserver_workers",
})  # fmt: skip
ALL_SCENARIOS = {**SCENARIOS, **EXTRA_SCENARIOS}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark wsserver against a plain-Tornado baseline in one run.",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="a few-second version of every scenario (keeps the scripts working)")
    parser.add_argument("--scenario", action="append", choices=sorted(ALL_SCENARIOS),
                        help="run only this scenario (repeatable); default: all but "
                             + ", ".join(sorted(EXTRA_SCENARIOS)) + " (minutes: name it)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where to write the JSON result (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="change one size of the preset (repeatable), e.g. "
                             "--param c100k_machine_connections=20000; names: "
                             "bench/runner.py's Params")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a target is missed (meaningless with --smoke)")
    return parser.parse_args(argv)  # fmt: skip


def with_overrides(params: Params, assignments: list[str]) -> Params:
    """``params`` with each ``NAME=VALUE`` applied (the value parsed as the field's type)."""
    fields = {f.name: f for f in dataclasses.fields(params)}
    changes: dict[str, Any] = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--param {assignment!r}: expected NAME=VALUE, NAME one of "
                             + ", ".join(sorted(fields)))
        current = getattr(params, name)
        try:
            if isinstance(current, tuple):
                changes[name] = tuple(int(part) for part in text.split(","))
            else:
                changes[name] = type(current)(text)
        except ValueError:
            raise ValueError(f"--param {assignment!r}: not a {type(current).__name__}") from None
    return dataclasses.replace(params, **changes)


def main(argv: list[str] | None = None) -> int:
    """Run, write, print. Exit 0 when every scenario ran (and, with --check, met its target)."""
    args = parse_args(argv)
    raise_fd_limit()
    params = SMOKE if args.smoke else FULL
    try:
        params = with_overrides(params, args.param)
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    names = args.scenario or list(SCENARIOS)
    server_cpus, generator_cpus = split_cpus()
    log_dir = args.output.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Server logs of the previous run (named KIND-PORT.log by ServerProcess) would pile up.
    for old_log in log_dir.glob("*-*.log"):
        if old_log.name.split("-", 1)[0] in SERVER_NAMES:
            old_log.unlink()
    bench = Bench(params, new_secret(), log_dir, server_cpus, generator_cpus)

    document: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "full",
        "machine": machine_info(),
        "pinning": {
            "server_cpus": sorted(server_cpus or ()),
            "generator_cpus": sorted(generator_cpus or ()),
            "loop_scenario": "servers not pinned, so task-pool workers can use every core",
            "redis": "redis-server on the server CPUs, like the wsserver nodes",
        },
        "params": params_dict(params),
        "param_overrides": args.param,
        "scenarios": {},
        "errors": {},
    }
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            result = ALL_SCENARIOS[name](bench)
        except (ServerError, RuntimeError, subprocess.SubprocessError, OSError) as exc:
            document["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"  {name} failed: {exc}", file=sys.stderr, flush=True)
            continue
        result["seconds"] = round(time.monotonic() - started, 1)
        document["scenarios"][name] = result
    rows = checks(document["scenarios"])
    document["checks"] = checks_json(rows)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(table(rows, document["errors"]))
    print(f"\nwritten: {args.output}   logs: {log_dir}", file=sys.stderr)
    if document["errors"]:
        return 1
    if args.check and any(row.passed is False for row in rows):
        return 1
    return 0
