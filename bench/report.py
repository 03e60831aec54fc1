"""Machine facts, the target checks and the printed table.

The targets are ratios (wsserver ÷ plain Tornado, same run) wherever the
machine's speed would otherwise decide the answer; the two that are absolute
(memory per connection, ping p99 with the pool saturated) are what a user of
the server experiences whatever the baseline does.

The cluster and history scenarios compare wsserver with itself (Redis broker
÷ memory broker, two nodes ÷ one, history on ÷ off): their metric names say
what the "wsserver" and "baseline" columns hold.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

Result = dict[str, Any]


def machine_info() -> dict[str, Any]:
    """CPU, memory, kernel, versions and the time: what a figure depends on."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "memory_mib": _mem_total_mib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git_commit(),
    }
    for package in ("tornado", "picows", "pyjwt", "fastapi", "uvicorn", "uvloop"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@dataclass(frozen=True)
class Check:
    """One row of the table: a metric for wsserver and its comparison, maybe a target."""

    scenario: str
    metric: str
    wsserver: float | bool | None
    baseline: float | bool | None
    ratio: float | None
    target: str
    passed: bool | None  # None: no target on this row, or nothing to judge


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, bool) or isinstance(b, bool):
        return None
    if isinstance(a, int | float) and isinstance(b, int | float) and b and not math.isnan(b):
        return a / b
    return None


def _ratio_at_least(bound: float) -> Callable[[Any, float | None], bool]:
    return lambda ws, ratio: ratio is not None and ratio >= bound


def _row(
    scenario: str,
    metric: str,
    ws: Any,
    base: Any,
    target: str = "",
    judge: Callable[[Any, float | None], bool] | None = None,
) -> Check:
    ratio = _ratio(ws, base)
    passed: bool | None = None
    if judge is not None and ws is not None:
        passed = bool(judge(ws, ratio))
    return Check(scenario, metric, ws, base, ratio, target, passed)


def _same_loop_rows(
    scenario: str, runs: Result, metric: str, key: str, unit: str
) -> list[Check]:
    """wsserver ÷ Tornado with both on the same event loop (no target: the loop's share)."""
    rows: list[Check] = []
    pairs = (("wsserver", "baseline_uvloop", "both on uvloop"),
             ("wsserver_asyncio", "baseline", "both on asyncio's loop"))  # fmt: skip
    for ws_name, base_name, label in pairs:
        if "median" in runs.get(ws_name, {}) and "median" in runs.get(base_name, {}):
            ws, base = runs[ws_name]["median"], runs[base_name]["median"]
            rows += [
                _row(scenario, f"{metric}, {label}", ws[key], base[key]),
                _row(scenario, f"server CPU µs per {unit}, {label}",
                     ws["server_cpu_us_per_unit"], base["server_cpu_us_per_unit"]),
            ]  # fmt: skip
    return rows


def checks(scenarios: dict[str, Result]) -> list[Check]:
    """The table rows for every scenario that ran.

    The targets are issue 14's: wsserver as installed (``--loop auto``, so
    uvloop) against plain Tornado as one writes it first (asyncio's loop);
    the same-loop rows after them say how much of each ratio the loop is.
    """
    rows: list[Check] = []
    echo = scenarios.get("echo", {})
    if "wsserver" in echo and "baseline" in echo:
        ws, base = echo["wsserver"]["median"], echo["baseline"]["median"]
        rows += [
            _row("echo", "messages/s", ws["messages_per_s"], base["messages_per_s"],
                 "ratio >= 2.5", _ratio_at_least(2.5)),
            _row("echo", "server CPU µs per message", ws["server_cpu_us_per_unit"],
                 base["server_cpu_us_per_unit"]),
            _row("echo", "p50 latency ms", ws["p50_ms"], base["p50_ms"]),
            _row("echo", "p99 latency ms", ws["p99_ms"], base["p99_ms"]),
            _row("echo", "errors + server closes", ws["errors"] + sum(ws["close_codes"].values()),
                 base["errors"] + sum(base["close_codes"].values()), "0", lambda w, r: w == 0),
        ]  # fmt: skip
        uv = echo.get("uvicorn", {})
        if "median" in uv:
            rows += [
                _row("echo", "messages/s vs FastAPI + uvicorn (in baseline column)",
                     ws["messages_per_s"], uv["median"]["messages_per_s"],
                     "ratio >= 1.0", _ratio_at_least(1.0)),
                _row("echo", "server CPU µs per message vs uvicorn",
                     ws["server_cpu_us_per_unit"], uv["median"]["server_cpu_us_per_unit"]),
                _row("echo", "plain Tornado vs uvicorn (both columns)",
                     base["messages_per_s"], uv["median"]["messages_per_s"]),
            ]  # fmt: skip
        else:
            rows.append(_row("echo", "uvicorn: " + str(uv.get("skipped", "not run")), None, None,
                             "ratio >= 1.0", lambda w, r: False))  # fmt: skip
        rows += _same_loop_rows("echo", echo, "messages/s", "messages_per_s", "message")
        rows += _node_rows("echo", echo, [
            ("messages/s", "messages_per_s", "", None),
            ("server CPU µs per message", "server_cpu_us_per_unit", "", None),
        ])  # fmt: skip
    idle = scenarios.get("idle", {})
    if "wsserver" in idle and "baseline" in idle:
        ws, base = idle["wsserver"]["median"], idle["baseline"]["median"]
        rows += [
            _row("idle", "connects/s", ws["connects_per_s"], base["connects_per_s"],
                 "ratio >= 1.5", _ratio_at_least(1.5)),
            _row("idle", "server CPU µs per connect", ws["server_cpu_us_per_unit"],
                 base["server_cpu_us_per_unit"]),
            _row("idle", "KiB per connection", ws["kib_per_connection"],
                 base["kib_per_connection"], "wsserver <= 8", lambda w, r: w <= 8),
            _row("idle", "connections open at the RSS reading", ws["still_open"],
                 base["still_open"], f"= {ws['connections']}",
                 lambda w, r: w == ws["connections"]),
        ]  # fmt: skip
        rows += _same_loop_rows("idle", idle, "connects/s", "connects_per_s", "connect")
        rows += _node_rows("idle", idle, [
            ("connects/s (wsserver authenticated, ws not)", "connects_per_s", "ratio >= 1.0",
             _ratio_at_least(1.0)),
            ("server CPU µs per connect", "server_cpu_us_per_unit", "", None),
            ("KiB per connection", "kib_per_connection", "", None),
        ])  # fmt: skip
    fan = scenarios.get("fanout", {})
    if "wsserver" in fan and "baseline" in fan:
        ws, base = fan["wsserver"]["median"], fan["baseline"]["median"]
        every = [r["all_delivered"] for r in fan["wsserver"]["rounds"]]
        rows += [
            _row("fanout", "deliveries/s", ws["deliveries_per_s"], base["deliveries_per_s"],
                 "ratio >= 6.0", _ratio_at_least(6.0)),
            _row("fanout", "server CPU µs per delivery", ws["server_cpu_us_per_unit"],
                 base["server_cpu_us_per_unit"]),
            _row("fanout", "every message to every member", all(every),
                 all(r["all_delivered"] for r in fan["baseline"]["rounds"]),
                 "wsserver: yes", lambda w, r: w is True),
            _row("fanout", "publish→last member p99 ms", ws["publish_to_last_member"]["p99_ms"],
                 base["publish_to_last_member"]["p99_ms"]),
        ]  # fmt: skip
        rows += _same_loop_rows("fanout", fan, "deliveries/s", "deliveries_per_s", "delivery")
        single = fan.get("one_in_flight", {})
        if "wsserver" in single and "baseline" in single:
            ws1, base1 = single["wsserver"]["median"], single["baseline"]["median"]
            rows += [
                _row("fanout", "deliveries/s, one publish in flight", ws1["deliveries_per_s"],
                     base1["deliveries_per_s"]),
                _row("fanout", "server CPU µs per delivery, one publish in flight",
                     ws1["server_cpu_us_per_unit"], base1["server_cpu_us_per_unit"]),
                _row("fanout", "every message to every member, one publish in flight",
                     _every(single["wsserver"]), _every(single["baseline"]),
                     "wsserver: yes", lambda w, r: w is True),
            ]  # fmt: skip
        rows += _node_rows("fanout", fan, [
            ("deliveries/s", "deliveries_per_s", "", None),
            ("server CPU µs per delivery", "server_cpu_us_per_unit", "", None),
        ])  # fmt: skip
        members = single.get("wsserver", {}).get("median", {}).get("members")
        rows += _node_rows("fanout", single, [
            (f"server CPU µs per delivery, one publish at a time into {members}",
             "server_cpu_us_per_unit", "ratio <= 0.6", _ratio_at_most(0.6)),
            (f"deliveries/s, one publish at a time into {members}", "deliveries_per_s", "",
             None),
        ])  # fmt: skip
        if "node_ws" in single:
            rows.append(_row("fanout", "every message to every member, one at a time (Node ws "
                             "in baseline column)", _every(single["wsserver"]),
                             _every(single["node_ws"]), "both: yes",
                             _both_delivered(single["wsserver"], single["node_ws"])))  # fmt: skip
        unwindowed = fan.get("no_window", {})
        if "no_window" in unwindowed and "windowed" in unwindowed:
            rows += _fanout_pair(
                "fanout", "all publishes back to back (10 in flight in baseline column)",
                "ratio >= 1.0", _ratio_at_least(1.0), unwindowed["no_window"],
                unwindowed["windowed"],
            )
    loop = scenarios.get("loop", {})
    if "wsserver" in loop and "baseline" in loop:
        ws, base = loop["wsserver"], loop["baseline"]
        rows += [
            _row("loop", "ping p99 ms, tasks running (baseline: inline)",
                 ws["median"]["p99_ms"], base["median"]["p99_ms"],
                 "wsserver < 50", lambda w, r: w < 50),
            _row("loop", "ping p50 ms, tasks running (baseline: inline)",
                 ws["median"]["p50_ms"], base["median"]["p50_ms"]),
            _row("loop", "ping p99 ms, no tasks", ws["pool_idle"]["p99_ms"],
                 base["pool_idle"]["p99_ms"]),
            _row("loop", "tasks/s while pinging", ws["median"]["tasks_per_s"],
                 base["median"]["tasks_per_s"]),
        ]  # fmt: skip
    rows += _cluster_checks(scenarios)
    proxy = scenarios.get("connect_proxy", {})
    if "wsserver_proxy" in proxy and "wsserver_jwt" in proxy:
        via, jwt_run = proxy["wsserver_proxy"]["median"], proxy["wsserver_jwt"]["median"]
        rows += [
            _row("connect_proxy", "connects/s, connect proxy (JWT in baseline column)",
                 via["connects_per_s"], jwt_run["connects_per_s"]),
            _row("connect_proxy", "server CPU µs per connect", via["server_cpu_us_per_unit"],
                 jwt_run["server_cpu_us_per_unit"]),
            _row("connect_proxy", "handshake p50 ms", via["handshake"]["p50_ms"],
                 jwt_run["handshake"]["p50_ms"]),
            _row("connect_proxy", "backend CPU µs per connect",
                 via.get("backend_cpu_us_per_connect"), None),
            _row("connect_proxy", "connections open at the end", via["still_open"],
                 jwt_run["still_open"], f"= {via['connections']}",
                 lambda w, r: w == via["connections"]),
        ]  # fmt: skip
    rows += _issue21_checks(scenarios)
    rows += _streaming_checks(scenarios)
    return rows


def _ratio_at_most(bound: float) -> Callable[[Any, float | None], bool]:
    return lambda ws, ratio: ratio is not None and ratio <= bound


Spec = tuple[str, str, str, Callable[[Any, float | None], bool] | None]


def _node_rows(scenario: str, runs: Result, specs: list[Spec]) -> list[Check]:
    """wsserver against Node's ``ws`` (in the baseline column), or why Node did not run."""
    node = runs.get("node_ws")
    if not node or "wsserver" not in runs:
        return []
    if "skipped" in node:
        return [_row(scenario, f"Node ws: skipped ({node['skipped']})", None, None)]
    ws, base = runs["wsserver"]["median"], node["median"]
    return [
        _row(scenario, f"{label} vs Node ws (in baseline column)", ws[key], base[key], target,
             judge)
        for label, key, target, judge in specs
    ]  # fmt: skip


def _skipped(scenario: str, result: Result) -> list[Check]:
    return [_row(scenario, f"skipped: {result['skipped']}", None, None)]


def _issue21_checks(scenarios: dict[str, Result]) -> list[Check]:
    """Rows of issue 21's scenarios: connects with Redis, wss://, compression, c100k."""
    rows: list[Check] = []
    red = scenarios.get("redis_idle", {})
    if "wsserver_redis" in red and "wsserver_memory" in red:
        r, m = red["wsserver_redis"]["median"], red["wsserver_memory"]["median"]
        rows += [
            _row("redis_idle", "connects/s, Redis (memory in baseline column)",
                 r["connects_per_s"], m["connects_per_s"], "ratio >= 0.8", _ratio_at_least(0.8)),
            _row("redis_idle", "server CPU µs per connect", r["server_cpu_us_per_unit"],
                 m["server_cpu_us_per_unit"]),
            _row("redis_idle", "Redis CPU µs per connect", r.get("redis_cpu_us_per_unit"), None),
            _row("redis_idle", "KiB per connection", r["kib_per_connection"],
                 m["kib_per_connection"]),
            _row("redis_idle", "connections open at the RSS reading", r["still_open"],
                 m["still_open"], f"= {r['connections']}",
                 lambda w, _: w == r["connections"] and m["still_open"] == m["connections"]),
        ]  # fmt: skip
    wss = scenarios.get("wss_echo", {})
    if "wsserver_wss" in wss and "wsserver" in wss:
        t, w = wss["wsserver_wss"]["median"], wss["wsserver"]["median"]
        rows += [
            _row("wss_echo", "messages/s, wss:// (ws:// in baseline column)", t["messages_per_s"],
                 w["messages_per_s"], "ratio >= 0.6", _ratio_at_least(0.6)),
            _row("wss_echo", "server CPU µs per message", t["server_cpu_us_per_unit"],
                 w["server_cpu_us_per_unit"]),
            _row("wss_echo", "p99 latency ms", t["p99_ms"], w["p99_ms"]),
            _row("wss_echo", "errors + server closes", t["errors"] + sum(t["close_codes"].values()),
                 w["errors"] + sum(w["close_codes"].values()), "0", lambda v, _: v == 0),
        ]  # fmt: skip
    rows += _compression_checks(scenarios.get("compression", {}))
    rows += _c100k_checks(scenarios.get("c100k", {}))
    return rows


def _compression_checks(comp: Result) -> list[Check]:
    if not comp:
        return []
    if "skipped" in comp:
        return _skipped("compression", comp)
    rows: list[Check] = []
    wire = comp["wire_bytes"]
    for setting, label in (("default_threshold", "default threshold"),
                           ("threshold_0", "--compression-threshold 0")):  # fmt: skip
        for item in wire[setting]["payloads"]:
            is_dashboard = item["name"] == "dashboard" and setting == "default_threshold"
            rows.append(_row(
                "compression",
                f"wire bytes, {item['name']} ({item['plain_message_bytes']} B message), {label}, "
                "deflate (plain in baseline column)",
                item["deflate_wire_bytes"], item["plain_wire_bytes"],
                "ratio <= 0.3" if is_dashboard else "", _ratio_at_most(0.3) if is_dashboard else None,
            ))  # fmt: skip
        errors = wire[setting]["errors"]
        rows.append(_row("compression", f"messages received intact, {label}", not errors, None,
                         "yes", lambda w, _: w is True))  # fmt: skip
    fan = comp["fanout"]
    on, off = fan["wsserver"], fan["wsserver_compression_off"]
    rows += [
        _row("compression", "fan-out server CPU µs per delivery, --compression on (off in "
             "baseline column)", on["median"]["server_cpu_us_per_unit"],
             off["median"]["server_cpu_us_per_unit"], "ratio <= 1.3", _ratio_at_most(1.3)),
        _row("compression", "fan-out deliveries/s", on["median"]["deliveries_per_s"],
             off["median"]["deliveries_per_s"]),
        _row("compression", "fan-out wire bytes per delivery",
             on["median"]["wire_bytes_per_delivery"], off["median"]["wire_bytes_per_delivery"]),
        _row("compression", "fan-out: every message to every member", _every(on), _every(off),
             "both: yes", _both_delivered(on, off)),
    ]  # fmt: skip
    sweep = comp["sweep"]
    for c, u in zip(sweep["compressed"]["sizes"], sweep["uncompressed"]["sizes"], strict=True):
        rows += [
            _row("compression", f"sweep, {c['size']} B of data: wire bytes per message, deflate "
                 "(uncompressed in baseline column)", c["wire_bytes"], u["wire_bytes"]),
            _row("compression", f"sweep, {c['size']} B of data: server CPU µs per message",
                 c["server_cpu_us_per_unit"], u["server_cpu_us_per_unit"]),
        ]  # fmt: skip
    return rows


def _c100k_checks(c100k: Result) -> list[Check]:
    if not c100k:
        return []
    rows: list[Check] = []
    node = c100k.get("node")
    if node:
        n = node["connections"]
        rows += [
            _row("c100k", f"one node: connects/s, {n:,} authenticated", node["connects_per_s"],
                 None),
            _row("c100k", "one node: server CPU µs per connect", node["server_cpu_us_per_unit"],
                 None),
            _row("c100k", "one node: KiB per connection", node["kib_per_connection"], None,
                 "<= 8", lambda w, _: w <= 8),
            _row("c100k", "one node: connections open at the RSS reading", node["still_open"],
                 None, f"= {n}", lambda w, _: w == n),
        ]  # fmt: skip
    machine = c100k.get("machine")
    if machine and "error" in machine:
        first_line = machine["error"].splitlines()[0][:200]
        rows.append(Check("c100k", f"one machine: did not finish: {first_line}", None, None,
                          None, "finishes", False))
    elif machine:
        m = machine
        rows += [
            _row("c100k", f"one machine, {m['workers']} workers + Redis: connections",
                 m["connections"], None, f"= {m['still_open']} still open",
                 lambda w, _: w == m["still_open"]),
            _row("c100k", "one machine: connects/s", m["connects_per_s"], None),
            _row("c100k", "one machine: workers' CPU µs per connect",
                 m["server_cpu_us_per_connect"], None),
            _row("c100k", "one machine: Redis CPU µs per connect", m["redis_cpu_us_per_connect"],
                 None),
            _row("c100k", "one machine: KiB per connection (sum of the workers' RSS)",
                 m["kib_per_connection"], None),
            _row("c100k", f"one machine: API publishes x {m['room_members']:,} members, "
                 "deliveries (expected in baseline column)", m["delivered"], m["expected"],
                 "all", lambda w, _: m["all_delivered"] is True),
        ]  # fmt: skip
    return rows


def _streaming_checks(scenarios: dict[str, Result]) -> list[Check]:
    """Rows of the HTTP-streaming scenario (streams in the wsserver column, WebSockets in
    the baseline column; one server)."""
    streaming = scenarios.get("streaming", {})
    if "sse" not in streaming or "websocket" not in streaming:
        return []
    rows = _fanout_pair("streaming", "streams (WebSockets in baseline column)", "ratio >= 0.5",
                        _ratio_at_least(0.5), streaming["sse"], streaming["websocket"])
    idle = streaming.get("idle", {})
    if "sse" in idle and "websocket" in idle:
        sse, ws = idle["sse"], idle["websocket"]
        rows += [
            _row("streaming", "KiB per idle stream (per idle WebSocket in baseline column)",
                 sse["kib_per_connection"], ws["kib_per_connection"]),
            _row("streaming", "streams open at the RSS reading", sse["still_open"],
                 ws["still_open"], f"= {sse['connections']}",
                 lambda w, r: w == sse["connections"]),
        ]  # fmt: skip
    return rows


def _every(runs: Result) -> bool:
    """Every round of one server delivered every message to every member."""
    return all(run["all_delivered"] for run in runs["rounds"])


def _both_delivered(ws_runs: Result, base_runs: Result) -> Callable[[Any, float | None], bool]:
    return lambda w, r: w is True and _every(base_runs)


def _fanout_pair(
    scenario: str, label: str, target: str, judge: Callable[[Any, float | None], bool] | None,
    ws_runs: Result, base_runs: Result,
) -> list[Check]:
    """Rows comparing two fan-out results of wsserver (``label`` names the columns)."""
    ws, base = ws_runs["median"], base_runs["median"]
    return [
        _row(scenario, f"deliveries/s, {label}", ws["deliveries_per_s"],
             base["deliveries_per_s"], target, judge),
        _row(scenario, "server CPU µs per delivery", ws["server_cpu_us_per_unit"],
             base["server_cpu_us_per_unit"]),
        _row(scenario, "every message to every member", _every(ws_runs), _every(base_runs),
             "both: yes", _both_delivered(ws_runs, base_runs)),
        _row(scenario, "publish→last member p99 ms", ws["publish_to_last_member"]["p99_ms"],
             base["publish_to_last_member"]["p99_ms"]),
    ]  # fmt: skip


def _cluster_checks(scenarios: dict[str, Result]) -> list[Check]:
    """Rows of the Redis, two-node and history scenarios (wsserver against itself)."""
    rows: list[Check] = []
    fan = scenarios.get("redis_fanout", {})
    if "wsserver_redis" in fan and "wsserver_memory" in fan:
        red, mem = fan["wsserver_redis"], fan["wsserver_memory"]
        rows += _fanout_pair("redis_fanout", "Redis (memory in baseline column)",
                             "ratio >= 0.8", _ratio_at_least(0.8), red, mem)  # fmt: skip
        rows.append(_row("redis_fanout", "Redis CPU µs per delivery",
                         red["median"].get("redis_cpu_us_per_unit"), None))  # fmt: skip
    echo = scenarios.get("redis_echo", {})
    if "wsserver_redis" in echo and "wsserver_memory" in echo:
        red, mem = echo["wsserver_redis"]["median"], echo["wsserver_memory"]["median"]
        rows += [
            _row("redis_echo", "messages/s, Redis (memory in baseline column)",
                 red["messages_per_s"], mem["messages_per_s"],
                 "ratio >= 0.95", _ratio_at_least(0.95)),
            _row("redis_echo", "server CPU µs per message", red["server_cpu_us_per_unit"],
                 mem["server_cpu_us_per_unit"]),
            _row("redis_echo", "Redis CPU µs per message", red.get("redis_cpu_us_per_unit"), None),
            _row("redis_echo", "errors + server closes",
                 red["errors"] + sum(red["close_codes"].values()),
                 mem["errors"] + sum(mem["close_codes"].values()), "0", lambda w, r: w == 0),
        ]  # fmt: skip
    nodes = scenarios.get("two_nodes", {})
    if "two_nodes" in nodes and "one_node" in nodes:
        two, one = nodes["two_nodes"], nodes["one_node"]
        rows += _fanout_pair("two_nodes", "two nodes (one node in baseline column)",
                             "", None, two, one)  # fmt: skip
        rows.append(_row("two_nodes", "Redis CPU µs per delivery",
                         two["median"].get("redis_cpu_us_per_unit"),
                         one["median"].get("redis_cpu_us_per_unit")))  # fmt: skip
    hist = scenarios.get("history", {})
    if "wsserver_history" in hist and "wsserver_nohistory" in hist:
        rows += _fanout_pair("history", "history on (off in baseline column)", "ratio >= 0.8",
                             _ratio_at_least(0.8), hist["wsserver_history"],
                             hist["wsserver_nohistory"])  # fmt: skip
    churn = hist.get("churn", {})
    if "churn" in churn and "no_churn" in churn:
        rows += _fanout_pair("history", "members joining and leaving at 20/s (none in "
                             "baseline column)", "ratio >= 0.9", _ratio_at_least(0.9),
                             churn["churn"], churn["no_churn"])  # fmt: skip
    recovery = hist.get("recovery")
    if recovery:
        count = recovery["messages"]
        counts = recovery["recovered_counts"]
        rows += [
            _row("history", f"join with since: {count} messages, median ms "
                 "(plain join in baseline column)",
                 recovery["recover"]["p50_ms"], recovery["plain_join"]["p50_ms"]),
            _row("history", "messages recovered per join (fewest)",
                 min(counts) if counts else None, None, f"= {count}, in order",
                 lambda w, r: recovery["all_recovered"] is True),
        ]  # fmt: skip
    drained = scenarios.get("drain", {})
    if "all_at_once" in drained and "paced" in drained:
        paced, burst = drained["paced"], drained["all_at_once"]
        rate = drained["drain_rate_per_s"]
        rows += [
            _row("drain", f"peak reconnects per 100 ms on the next node, --drain-rate {rate} "
                 "(all at once in baseline column)",
                 paced["peak_reconnects_per_100ms"], burst["peak_reconnects_per_100ms"],
                 "ratio <= 0.5", lambda w, r: r is not None and r <= 0.5),
            _row("drain", "seconds until the last client is back",
                 paced["last_reconnect_s"], burst["last_reconnect_s"]),
            _row("drain", "clients back on the next node (all of them)",
                 paced["reconnected"], burst["reconnected"], "= connections",
                 lambda w, r: w == paced["connections"]
                 and burst["reconnected"] == burst["connections"]),
        ]  # fmt: skip
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def table(rows: list[Check], errors: dict[str, str]) -> str:
    """The rows as a fixed-width text table (also valid Markdown)."""
    header = ("scenario", "metric", "wsserver", "baseline", "ratio", "target", "result")
    lines = [header]
    for row in rows:
        verdict = {True: "pass", False: "FAIL", None: ""}[row.passed]
        lines.append((
            row.scenario, row.metric, _fmt(row.wsserver), _fmt(row.baseline),
            _fmt(row.ratio), row.target, verdict,
        ))  # fmt: skip
    for scenario, error in errors.items():
        lines.append((scenario, "did not run: " + error.splitlines()[0], "", "", "", "", "ERROR"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        out.append("| " + " | ".join(cells) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def checks_json(rows: list[Check]) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]
