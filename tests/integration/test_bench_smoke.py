"""``python -m bench --smoke`` keeps working: every scenario runs and reports sane figures.

Benchmarks are not timed tests: nothing here asserts a performance target
(the smoke sizes are far too small to mean anything). It proves the scripts
start wsserver, the baseline, ``redis-server`` and the load generator, that
each scenario's checks of correctness hold (every echo answered, every
publish delivered to every member, through Redis and across two nodes too,
every idle connection open when memory is read, every ping answered, 300
messages recovered on a join with ``since``, every client of a stopped node
back on the next one), and that the JSON result and the table are written.
Issue 21's parts too: Node's ``ws`` in echo, idle and
fan-out (installed by the bench with ``npm ci``; where npm is missing the
result must say so instead), echo over ``wss://``, connects with the Redis
broker, the compression rows (every message inflated intact, or skipped with
the reason while the server does not negotiate permessage-deflate) and,
in a run of its own, the 100k scenario at a few hundred connections.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.redis_server import require_redis_server

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("wsserver", "baseline")
SCENARIOS = {"echo", "idle", "fanout", "loop", "redis_fanout", "redis_echo", "two_nodes", "history",
             "connect_proxy", "drain", "redis_idle", "wss_echo", "compression",
             "streaming"}
#: In CI node and npm are installed, so the Node ws baseline must run there.
HAVE_NPM = shutil.which("node") is not None and shutil.which("npm") is not None
BROKERS = ("wsserver_redis", "wsserver_memory")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    require_redis_server()
    output = tmp_path_factory.mktemp("bench") / "latest.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return proc, output


@pytest.fixture(scope="module")
def result(smoke: tuple[subprocess.CompletedProcess[str], Path]) -> dict[str, Any]:
    proc, output = smoke
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document: dict[str, Any] = json.loads(output.read_text())
    return document


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_exits_zero_and_prints_the_table(
    smoke: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, _ = smoke
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = proc.stdout.splitlines()[0]
    for column in ("scenario", "metric", "wsserver", "baseline", "ratio", "target", "result"):
        assert column in header
    for scenario in SCENARIOS:
        assert f"| {scenario} " in proc.stdout


def test_result_describes_the_run(result: dict[str, Any]) -> None:
    assert result["mode"] == "smoke"
    # The smoke sizes, not the full benchmark's 10,000 connections.
    assert result["params"]["idle_connections"] <= 1000
    assert result["errors"] == {}
    assert set(result["scenarios"]) == SCENARIOS
    machine = result["machine"]
    assert machine["cpu_model"] and machine["python"] and machine["tornado"]
    assert machine["date"].startswith("20")
    checked = {row["scenario"] for row in result["checks"]}
    assert checked == SCENARIOS


def test_echo_every_message_answered(result: dict[str, Any]) -> None:
    echo = result["scenarios"]["echo"]
    for server in SERVERS:
        run = echo[server]["median"]
        assert run["connections"] == result["params"]["echo_connections"]
        assert run["replies"] > 0 and positive(run["messages_per_s"])
        assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
        assert run["errors"] == 0, run["first_error"]
        assert run["close_codes"] == {}
    uvicorn = echo["uvicorn"]
    # The stretch server is optional: either it ran, or the result says why not.
    assert positive(uvicorn["median"]["messages_per_s"]) if "median" in uvicorn else (
        "not installed" in uvicorn["skipped"]
    )


def test_idle_connections_all_open_and_memory_read(result: dict[str, Any]) -> None:
    for server in SERVERS:
        run = result["scenarios"]["idle"][server]["median"]
        assert run["connections"] == run["still_open"] == result["params"]["idle_connections"]
        assert positive(run["connects_per_s"])
        assert run["rss_after_kib"] > run["rss_before_kib"] > 0
        assert positive(run["kib_per_connection"])
        assert run["close_codes"] == {}


def test_fanout_delivers_every_message_to_every_member(result: dict[str, Any]) -> None:
    params = result["params"]
    for server in SERVERS:
        for run in result["scenarios"]["fanout"][server]["rounds"]:
            assert run["expected"] == params["fanout_members"] * params["fanout_publishes"]
            assert run["delivered"] == run["expected"]
            assert run["all_delivered"] is True and run["errors"] == 0, run["first_error"]
            assert positive(run["deliveries_per_s"])


def test_loop_pings_answered_with_and_without_tasks(result: dict[str, Any]) -> None:
    loop = result["scenarios"]["loop"]
    for server in SERVERS:
        quiet, loaded = loop[server]["pool_idle"], loop[server]["median"]
        for run in (quiet, loaded):
            assert run["pings"] > 0 and run["unanswered_after_grace"] == 0
            assert 0 < run["p50_ms"] <= run["p99_ms"]
            assert run["errors"] == 0, run["first_error"]
        assert quiet["tasks_completed"] == 0
        assert loaded["tasks_completed"] > 0


def assert_every_delivery(run: dict[str, Any], params: dict[str, Any]) -> None:
    assert run["expected"] == params["fanout_members"] * params["fanout_publishes"]
    assert run["delivered"] == run["expected"]
    assert run["all_delivered"] is True and run["errors"] == 0, run["first_error"]
    assert run["close_codes"] == {} and not run["timed_out"]
    assert positive(run["deliveries_per_s"])


def test_redis_fanout_delivers_every_message_through_redis(result: dict[str, Any]) -> None:
    fan = result["scenarios"]["redis_fanout"]
    for server in BROKERS:
        for run in fan[server]["rounds"]:
            assert_every_delivery(run, result["params"])
            assert run["room"] == "bench" and run["nodes"] == 1
    # Redis's CPU is measured in the Redis rounds only.
    assert "redis_cpu_us_per_unit" in fan["wsserver_redis"]["median"]
    assert "redis_cpu_us_per_unit" not in fan["wsserver_memory"]["median"]


def test_redis_echo_every_message_answered(result: dict[str, Any]) -> None:
    echo = result["scenarios"]["redis_echo"]
    for server in BROKERS:
        run = echo[server]["median"]
        assert run["replies"] > 0 and positive(run["messages_per_s"])
        assert run["errors"] == 0, run["first_error"]
        assert run["close_codes"] == {}


def test_two_nodes_deliver_every_message_on_both_nodes(result: dict[str, Any]) -> None:
    nodes = result["scenarios"]["two_nodes"]
    for name, count in (("two_nodes", 2), ("one_node", 1)):
        for run in nodes[name]["rounds"]:
            assert run["nodes"] == count
            assert_every_delivery(run, result["params"])
            # A smoke run can be shorter than the CPU clock's tick (10 ms) on
            # a node: a figure, but not necessarily above zero.
            cpu = run["server_cpu_us_per_unit"]
            assert isinstance(cpu, int | float) and math.isfinite(cpu) and cpu >= 0


def test_history_fanout_and_recovery(result: dict[str, Any]) -> None:
    hist = result["scenarios"]["history"]
    for server, room in (("wsserver_history", "hist:bench"), ("wsserver_nohistory", "bench")):
        for run in hist[server]["rounds"]:
            assert run["room"] == room
            assert_every_delivery(run, result["params"])
    recovery = hist["recovery"]
    assert recovery["messages"] == 300
    assert recovery["joins"] == result["params"]["recovery_joins"]
    assert recovery["recovered_counts"] == [300] * recovery["joins"]
    assert recovery["all_recovered"] is True and recovery["errors"] == 0, recovery["first_error"]
    assert 0 < recovery["recover"]["p50_ms"] <= recovery["recover"]["max_ms"]
    assert positive(recovery["plain_join"]["p50_ms"])
    assert recovery["close_codes"] == {}


def test_connect_proxy_connects_every_client_through_the_backend(result: dict[str, Any]) -> None:
    scenario = result["scenarios"]["connect_proxy"]
    for server in ("wsserver_jwt", "wsserver_proxy"):
        run = scenario[server]["median"]
        assert run["connections"] == run["still_open"] == result["params"]["proxy_connections"]
        assert positive(run["connects_per_s"]) and run["close_codes"] == {}
    assert positive(scenario["wsserver_proxy"]["median"]["backend_cpu_us_per_connect"])
    assert positive(scenario["proxy_to_jwt_connects"])


def test_drain_every_client_reconnects_to_the_next_node(result: dict[str, Any]) -> None:
    drain = result["scenarios"]["drain"]
    count = result["params"]["drain_connections"]
    for name, code in (("all_at_once", "1001"), ("paced", "1012")):
        run = drain[name]
        assert run["close_codes"] == {code: count} and run["closed"] == count
        assert run["reconnected"] == count and run["failed"] == 0, run["first_failure"]
        assert sum(run["reconnects_per_100ms"]) == count
        assert 0 < run["peak_reconnects_per_100ms"] <= count
        assert run["draining_exit_code"] == 0
    # At --drain-rate N the closes take about connections / N seconds.
    paced = drain["paced"]
    assert paced["last_close_s"] - paced["first_close_s"] >= 0.8 * count / drain["drain_rate_per_s"]
def node_ws(runs: dict[str, Any]) -> dict[str, Any] | None:
    """Node ws's runs of a scenario, or None after checking it says why it was skipped."""
    node = runs["node_ws"]
    if not HAVE_NPM:
        assert "not both on PATH" in node["skipped"]
        return None
    assert "skipped" not in node, node
    return node


def test_node_ws_answers_echo_and_idle_like_the_others(result: dict[str, Any]) -> None:
    echo = node_ws(result["scenarios"]["echo"])
    if echo is not None:
        run = echo["median"]
        assert run["replies"] > 0 and run["errors"] == 0, run["first_error"]
        assert run["close_codes"] == {}
    idle = node_ws(result["scenarios"]["idle"])
    if idle is not None:
        run = idle["median"]
        assert run["connections"] == run["still_open"] == result["params"]["idle_connections"]
        assert positive(run["connects_per_s"]) and positive(run["kib_per_connection"])


def test_node_ws_fanout_delivers_every_message_one_at_a_time_too(result: dict[str, Any]) -> None:
    fan = result["scenarios"]["fanout"]
    windowed = node_ws(fan)
    single = node_ws(fan["one_in_flight"])
    params = result["params"]
    for server in SERVERS:
        for run in fan["one_in_flight"][server]["rounds"]:
            assert run["members"] == params["fanout_single_members"] and run["window"] == 1
            assert run["all_delivered"] is True, run["first_error"]
    if windowed is not None and single is not None:
        for run in windowed["rounds"]:
            assert_every_delivery(run, params)
        for run in single["rounds"]:
            assert run["members"] == params["fanout_single_members"]
            assert run["all_delivered"] is True and run["errors"] == 0, run["first_error"]


def test_redis_idle_connects_all_through_redis(result: dict[str, Any]) -> None:
    idle = result["scenarios"]["redis_idle"]
    for server in BROKERS:
        run = idle[server]["median"]
        assert run["connections"] == run["still_open"] == result["params"]["idle_connections"]
        assert positive(run["connects_per_s"]) and run["close_codes"] == {}
    assert "redis_cpu_share" in idle["wsserver_redis"]["median"]
    assert "redis_cpu_share" not in idle["wsserver_memory"]["median"]


def test_wss_echo_answers_every_message_over_tls(result: dict[str, Any]) -> None:
    wss = result["scenarios"]["wss_echo"]
    for server in ("wsserver_wss", "wsserver"):
        run = wss[server]["median"]
        assert run["replies"] > 0 and run["errors"] == 0, run["first_error"]
        assert run["close_codes"] == {}


def test_compression_measures_intact_messages_or_says_why_not(result: dict[str, Any]) -> None:
    comp = result["scenarios"]["compression"]
    if comp["probe"]["negotiated"] is False:
        assert comp["probe"]["extensions"] is None
        assert "does not negotiate permessage-deflate" in comp["skipped"]
        return
    for setting in ("default_threshold", "threshold_0"):
        wire = comp["wire_bytes"][setting]
        assert wire["errors"] == []
        dashboard = next(p for p in wire["payloads"] if p["name"] == "dashboard")
        assert dashboard["deflate_compressed"] and not dashboard["plain_compressed"]
        assert dashboard["deflate_wire_bytes"] < dashboard["plain_wire_bytes"]
    for name, compressing in (("wsserver", True), ("wsserver_compression_off", False)):
        for run in comp["fanout"][name]["rounds"]:
            assert run["all_delivered"] is True and not run["timed_out"], run["first_error"]
            assert (run["compressed_deliveries"] == run["delivered"]) is compressing
            assert run["negotiated"] == (run["members"] if compressing else 0)
    sweep = comp["sweep"]
    assert sweep["compressed"]["negotiated"] and not sweep["uncompressed"]["negotiated"]
    assert [r["size"] for r in sweep["compressed"]["sizes"]] == result["params"]["sweep_sizes"]
    assert sweep["compressed"]["errors"] == sweep["uncompressed"]["errors"] == []


def test_c100k_scenario_at_smoke_size(tmp_path: Path) -> None:
    """The 100k scenario's machinery, at a few hundred connections (not in the default run)."""
    require_redis_server()
    output = tmp_path / "c100k.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--scenario", "c100k", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(output.read_text())
    params, c100k = document["params"], document["scenarios"]["c100k"]
    assert c100k["kernel_problems"] == [] and c100k["kernel"]["rlimit_nofile"][1] > 0
    node = c100k["node"]
    assert node["connections"] == node["still_open"] == params["c100k_node_connections"]
    machine = c100k["machine"]
    assert machine["workers"] == len(machine["worker_pids"]) == params["c100k_workers"]
    assert machine["connections"] == machine["still_open"] == params["c100k_machine_connections"]
    assert machine["room_members"] == params["c100k_room_members"]
    assert machine["expected"] == params["c100k_room_members"] * params["c100k_publishes"]
    assert machine["delivered"] == machine["expected"] and machine["all_delivered"] is True
    assert machine["errors"] == 0 and machine["close_codes"] == {}
    assert positive(machine["connects_per_s"]) and positive(machine["kib_per_connection"])
    assert "| c100k " in proc.stdout


def test_streaming_fanout_and_idle_streams(result: dict[str, Any]) -> None:
    streaming = result["scenarios"]["streaming"]
    params = result["params"]
    for transport in ("sse", "websocket"):
        for run in streaming[transport]["rounds"]:
            assert run["transport"] == transport
            assert run["members"] == params["stream_members"]
            # The members and the WebSocket publisher, which is a member too.
            assert run["expected"] == (params["stream_members"] + 1) * params["stream_publishes"]
            assert run["delivered"] == run["expected"]
            assert run["all_delivered"] is True and run["errors"] == 0, run["first_error"]
            assert run["close_codes"] == {} and not run["timed_out"]
        idle = streaming["idle"][transport]
        assert idle["connections"] == idle["still_open"] == params["stream_idle_connections"]
        assert idle["rss_after_kib"] > idle["rss_before_kib"] > 0
        assert positive(idle["kib_per_connection"])
