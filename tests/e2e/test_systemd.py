"""The systemd unit, checked by systemd's own analyzer, and sd_notify from a real server.

``systemd-analyze verify`` and ``security --offline=true`` read unit files
without a running systemd, so these run on any machine with the Debian
``systemd`` package. The notification tests bind a real ``AF_UNIX`` datagram
socket, hand it to a real ``python -m wsserver`` as ``NOTIFY_SOCKET``, and
read what systemd would read.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import notify
from tests.support.aio import run
from tests.support.clients import connect
from tests.support.deploy import (
    ENV_EXAMPLE,
    UNIT,
    UNIT_PYTHON,
    systemd_analyze,
    unit_service_settings,
)
from tests.support.http import fetch
from tests.support.notify import NotifySocket
from tests.support.servers import RunningServer, ServerFactory, free_port, run_cli
from tests.support.tokens import KEYED_ENV, mint
from wsserver.config import OPTIONS, OPTIONS_BY_NAME

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(systemd_analyze() is None, reason="needs systemd-analyze (Debian: systemd)"),
]

EXPOSURE = re.compile(r"Overall exposure level for wsserver\.service: (\d+\.\d+)")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, check=False, timeout=60
    )


def local_unit(directory: Path, text: str | None = None) -> Path:
    """The shipped unit with its interpreter pointed at this test run's Python.

    ``verify`` checks that ExecStart's binary exists, and a CI machine has no
    /opt/wsserver; everything else in the file stays as shipped.
    """
    text = UNIT.read_text() if text is None else text
    assert UNIT_PYTHON in text
    path = directory / "wsserver.service"
    path.write_text(text.replace(UNIT_PYTHON, sys.executable))
    return path


def exposure(unit: Path) -> float:
    result = analyze("security", "--offline=true", "--no-pager", str(unit))
    match = EXPOSURE.search(result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


# --- the unit file ----------------------------------------------------------------


def test_verify_reports_no_problem(tmp_path: Path) -> None:
    result = analyze("verify", str(local_unit(tmp_path)))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "wsserver" not in output, output


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    # The same check on the unit as shipped, on a machine without /opt/wsserver,
    # and on a unit with a typo, must complain: the check above is not blind.
    broken = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    result = analyze("verify", str(local_unit(tmp_path, broken)))
    assert "NoNewPrivilege" in result.stdout + result.stderr
    if not Path(UNIT_PYTHON).exists():
        shipped = analyze("verify", str(UNIT))
        assert "is not executable" in shipped.stdout + shipped.stderr


def test_security_exposure_is_at_most_2() -> None:
    level = exposure(UNIT)
    assert level <= 2.0
    # systemd-analyze's threshold is on its 0-100 scale: 20 means 2.0.
    assert analyze("security", "--offline=true", "--threshold=20", str(UNIT)).returncode == 0


def test_security_score_drops_without_hardening(tmp_path: Path) -> None:
    # Only the directives above the hardening marker: the score must be bad,
    # which shows the number parsed above measures this file.
    bare = UNIT.read_text().split("# --- hardening", 1)[0]
    path = tmp_path / "wsserver.service"
    path.write_text(bare)
    assert exposure(path) > 5.0


def test_unit_runs_the_server_the_way_the_contract_says() -> None:
    service = unit_service_settings(UNIT.read_text())
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [f"{UNIT_PYTHON} -m wsserver"]
    assert service["ExecStartPre"] == [f"{UNIT_PYTHON} -m wsserver check-config"]
    assert service["Restart"] == ["on-failure"]
    assert int(service["LimitNOFILE"][0]) >= 65536
    assert service["DynamicUser"] == ["yes"]
    # The watchdog is fed every WatchdogSec/2 from the event loop; a few
    # seconds of a busy loop must not count as wedged.
    assert _seconds(service["WatchdogSec"][0]) >= 10
    # Stop must outlast the server's drain (SIGTERM, 1001 to clients, wait).
    drain = float(OPTIONS_BY_NAME["drain_timeout"].default)
    assert _seconds(service["TimeoutStopSec"][0]) >= drain + 5
    # The key comes from a credential, never from the unit itself.
    assert service["LoadCredential"] == ["jwt-secret:/etc/wsserver/jwt-secret"]
    assert "WSSERVER_JWT_SECRET_FILE=%d/jwt-secret" in service["Environment"]
    assert not any("WSSERVER_JWT_SECRET=" in env for env in service["Environment"])
    assert service["EnvironmentFile"] == ["-/etc/wsserver/wsserver.env"]


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


# --- the example environment file -------------------------------------------------


def _example_lines() -> tuple[dict[str, str], set[str]]:
    active: dict[str, str] = {}
    mentioned: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^(#?)(WSSERVER_[A-Z0-9_]+)=(.*)$", line)
        if match:
            mentioned.add(match.group(2))
            if not match.group(1):
                active[match.group(2)] = match.group(3)
    return active, mentioned


def test_env_example_names_every_setting_and_only_real_ones() -> None:
    _, mentioned = _example_lines()
    known = {option.env for option in OPTIONS}
    assert mentioned <= known, mentioned - known
    # The key is set by the unit (credential), never in this file.
    expected = known - {"WSSERVER_JWT_SECRET", "WSSERVER_JWT_SECRET_FILE"}
    assert expected <= mentioned, expected - mentioned
    assert "WSSERVER_JWT_SECRET" not in mentioned


def test_env_example_passes_check_config(tmp_path: Path) -> None:
    # What ExecStartPre runs on an installed host: the example's active lines
    # plus the credential the unit adds.
    active, _ = _example_lines()
    key = tmp_path / "jwt-secret"
    # The key made as docs/deploy.md says: `umask 077; openssl rand -base64 48 > FILE`.
    with key.open("wb") as out:
        subprocess.run(["openssl", "rand", "-base64", "48"], stdout=out, check=True, timeout=30)
    key.chmod(0o600)
    result = run_cli("check-config", env={**active, "WSSERVER_JWT_SECRET_FILE": str(key)},
                     timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_config_in_exec_start_pre_refuses_a_short_key(tmp_path: Path) -> None:
    key = tmp_path / "jwt-secret"
    key.write_text("too-short\n")
    result = run_cli("check-config", env={"WSSERVER_JWT_SECRET_FILE": str(key)}, timeout=30)
    assert result.returncode == 2
    assert "too-short" not in result.stdout + result.stderr


# --- sd_notify from a real server ----------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    with notify.path_socket() as listener:
        yield listener


StartServer = Callable[..., RunningServer]


@pytest.fixture
def start_server(run_server: ServerFactory) -> StartServer:
    """``start_server(env, *args, launcher=())``: ``python -m wsserver`` started as
    systemd would, with the environment only, on a port chosen beforehand and
    not waited for (READY=1 says when it serves). ``launcher`` is a command put
    in front, as systemd's sandboxing would be."""

    def start(env: dict[str, str], *args: str, launcher: tuple[str, ...] = ()) -> RunningServer:
        return run_server("--port", str(free_port()), *args, launcher=launcher, wait=False,
                          env={**env, **KEYED_ENV, "WSSERVER_TASK_WORKERS": "1"})

    return start


def status_of(server: RunningServer, path: str) -> int:
    """Status of ``GET path``: one attempt, no retry."""
    return fetch(server.url + path, timeout=5).status


def test_ready_once_listening_then_stopping_on_sigterm(
    notify_socket: NotifySocket, start_server: StartServer
) -> None:
    server = start_server({"NOTIFY_SOCKET": notify_socket.env_value})
    before = notify_socket.wait_for("READY=1")
    assert not any("STOPPING=1" in lines for lines in before)
    # READY=1 promises the server answers: one attempt, no retry.
    assert status_of(server, "/healthz") == 200
    assert status_of(server, "/readyz") == 200

    server.proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1")
    assert server.stop() == 0, server.logs()


def test_watchdog_pings_when_asked(
    notify_socket: NotifySocket, start_server: StartServer
) -> None:
    # WatchdogSec=0.4s: systemd expects a WATCHDOG=1 at least every 0.4 s.
    start_server({"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "400000"})
    notify_socket.wait_for("READY=1")
    started = time.monotonic()
    for _ in range(3):
        notify_socket.wait_for("WATCHDOG=1", timeout=2)
    # Three pings at WatchdogSec/2 take about 0.6 s: a loop, not a burst.
    assert time.monotonic() - started >= 0.3


def test_no_watchdog_pings_for_another_process(
    notify_socket: NotifySocket, start_server: StartServer
) -> None:
    # WATCHDOG_PID names the process systemd watches; it is not this server.
    start_server(
        {"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    )
    notify_socket.wait_for("READY=1")
    # Absence can only be watched for a while: ten intervals' worth.
    deadline = time.monotonic() + 1.0
    while (remaining := deadline - time.monotonic()) > 0:
        notify_socket.sock.settimeout(remaining)
        try:
            lines = notify_socket.sock.recv(4096).decode().split("\n")
        except TimeoutError:
            break
        assert "WATCHDOG=1" not in lines


# --- MemoryDenyWriteExecute= does not break the server ------------------------------

#: prctl(2) PR_SET_MDWE / PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3): the kernel's
#: own form of what systemd's MemoryDenyWriteExecute= enforces with seccomp,
#: no writable+executable mappings. It survives execve and fork, so the
#: server and its task workers all run under it.
MDWE_LAUNCHER = (
    sys.executable, "-c",
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"
    "    sys.exit(f'PR_SET_MDWE failed: {os.strerror(ctypes.get_errno())}')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n",
)


def _kernel_has_mdwe() -> bool:
    probe = subprocess.run(
        [*MDWE_LAUNCHER, sys.executable, "-c", "import mmap\n"
         "mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    # Under MDWE a W+X mapping is refused with EACCES: the probe must fail so.
    return probe.returncode != 0 and "Permission denied" in probe.stderr


def test_server_serves_under_memory_deny_write_execute(
    notify_socket: NotifySocket, start_server: StartServer
) -> None:
    if not _kernel_has_mdwe():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    server = start_server({"NOTIFY_SOCKET": notify_socket.env_value}, launcher=MDWE_LAUNCHER)
    notify_socket.wait_for("READY=1")

    async def scenario() -> list[dict[str, object] | None]:
        ws = await connect(server, mint("alice"))
        replies = [await ws.recv()]
        # A task runs in a worker process (forkserver), a child that
        # inherits the same restriction.
        replies.append(await ws.ask({"type": "task", "name": "primes", "args": {"limit": 1000}},
                                    timeout=30))
        await ws.close()
        return replies

    welcome, result = run(scenario)
    assert welcome["type"] == "welcome", welcome
    assert result == {"type": "result", "name": "primes", "value": 168}, result
    assert server.stop() == 0, server.logs()


def _bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", value)
    assert match, value
    return int(match.group(1)) * 1024 ** " KMG".index(match.group(2) or " ")


def test_unit_caps_memory_tasks_and_binds() -> None:
    service = unit_service_settings(UNIT.read_text())
    high, top = _bytes(service["MemoryHigh"][0]), _bytes(service["MemoryMax"][0])
    # Reclaim (slow down) before the OOM killer, and room for a few task workers.
    assert 256 * 1024**2 <= high < top
    assert 64 <= int(service["TasksMax"][0]) <= 4096
    # Only the server's own port may be bound; everything else is refused.
    port = OPTIONS_BY_NAME["port"].default
    assert service["SocketBindAllow"] == [f"tcp:{port}"]
    assert service["SocketBindDeny"] == ["any"]


def test_resource_lines_pass_verify_and_keep_the_exposure(tmp_path: Path) -> None:
    # Misspelt resource lines are caught by verify (the check is not blind) ...
    broken = UNIT.read_text().replace("SocketBindDeny=any", "SocketBindDeny=anything")
    result = analyze("verify", str(local_unit(tmp_path, broken)))
    assert "SocketBindDeny" in result.stdout + result.stderr
    # ... and the shipped ones keep the score (1.0 with systemd 252).
    assert exposure(UNIT) <= 2.0
