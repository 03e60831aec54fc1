"""Redis Sentinel for tests: a master, a replica and sentinels, real processes on
free loopback ports (``redis-server --sentinel``; Debian's ``redis-sentinel`` is
the same binary).

    with SentinelGroup(tmp_path, password="pw") as group:
        run_server("--broker", group.url, ...)
        group.kill_master()
        group.wait_for_failover()
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from tests.support.redis_server import REDIS_SERVER, RedisServer
from tests.support.servers import free_port

MASTER = "mymaster"
#: Sentinels take a master for down after this long without an answer.
DOWN_AFTER_MS = 1000
WAIT = 30.0


class SentinelGroup:
    """The master (AOF on), one replica and ``sentinels`` sentinels (quorum a majority).

    The master and replica require ``password``; the sentinels know it
    (``auth-pass``) and require none themselves.
    """

    def __init__(self, directory: Path, password: str, sentinels: int = 3) -> None:
        self.directory = directory
        self.password = password
        # No delay before a replica's first sync (the default waits 5 s for more).
        auth = ["--requirepass", password, "--masterauth", password, "--appendonly", "yes",
                "--appendfsync", "always", "--repl-diskless-sync-delay", "0"]
        self.master = RedisServer(directory / "master", extra=auth, password=password)
        self.replica = RedisServer(directory / "replica", password=password, extra=[
            *auth, "--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.quorum = sentinels // 2 + 1
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://:{self.password}@{hosts}/{MASTER}/0"

    def start(self) -> SentinelGroup:
        self.master.start()
        self.replica.start()
        self._until(lambda: self.replica_info().get("master_link_status") == "up",
                    "replica in sync")
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} {self.quorum}\n"
                f"sentinel auth-pass {MASTER} {self.password}\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
            )
            log = (self.directory / f"sentinel-{port}.log").open("wb")
            self._sentinels.append(subprocess.Popen(
                [REDIS_SERVER, str(conf), "--sentinel"], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            ))
            log.close()
        # A failover needs every sentinel to know the replica and a majority of peers.
        others = len(self.sentinel_ports) - 1
        self._until(lambda: all(
            self.sentinel(port, "SENTINEL", "REPLICAS", MASTER)
            and int(self._state(port)[b"num-other-sentinels"]) == others
            for port in self.sentinel_ports
        ), "sentinels that know the replica and each other")
        return self

    def sentinel(self, port: int, *args: str) -> Any:
        """A command to one sentinel."""
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        except redis.exceptions.ConnectionError:
            return None
        finally:
            client.close()

    def _state(self, port: int) -> dict[bytes, Any]:
        """What one sentinel knows of the master (redis-py answers a dict of bytes)."""
        state: dict[bytes, Any] = self.sentinel(port, "SENTINEL", "MASTER", MASTER) or {}
        return state

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers sees it."""
        for port in self.sentinel_ports:
            answer = self.sentinel(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
            if answer:
                return int(answer[1])
        return None

    def replica_info(self) -> dict[str, Any]:
        """The replica's ``INFO replication``, parsed (redis-py answers a dict)."""
        info: dict[str, Any] = self.replica.command("INFO", "replication")
        return info

    def kill_master(self) -> None:
        """SIGKILL the master: no goodbye to its clients or replica."""
        import signal

        self.master.stop(signal.SIGKILL)

    def wait_for_failover(self, timeout: float = WAIT) -> float:
        """Until the sentinels name the replica as master and it says so; seconds taken."""
        started = time.monotonic()
        self._until(lambda: self.master_port() == self.replica.port
                    and self.replica_info().get("role") == "master", "the replica promoted",
                    timeout)
        return time.monotonic() - started

    def _until(self, check: Any, what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except (redis.exceptions.RedisError, OSError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text(errors="replace")[-2000:]
                                 for p in sorted(self.directory.glob("sentinel-*.log")))
                raise AssertionError(f"not {what} after {timeout} s; sentinel logs:\n{logs}")
            # Sentinel state changes announce nothing to a plain client: polled.
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self._sentinels:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._sentinels:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._sentinels = []
        self.replica.stop()
        self.master.stop()

    def __enter__(self) -> SentinelGroup:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
