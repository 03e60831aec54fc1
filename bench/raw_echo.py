"""Raw echo throughput of the frame layer against plain Tornado and uvicorn, in one run.

    python -m bench.raw_echo [--seconds 3] [--rounds 3] [--connections 32] [--size 64]

Starts each echo server pinned to CPU 0 (``taskset``), drives it from a picows
closed-loop generator pinned to CPU 1 (every connection sends a text message,
waits for it back, sends the next), and prints messages/s, messages per
second of server CPU, and the ratios. The servers take turns, ``--rounds``
times, and the median of each is reported: on a shared machine the load of
others moves single runs a lot, and per CPU-second is the steadier figure.
Servers: ``tests/conformance/echo_server.py`` (wsserver's frame layer, on the
default asyncio loop and on uvloop), and the plain reference echo servers in
``bench/echo/`` (Tornado, uvicorn[standard] with a raw ASGI app).
No JSON and no token: this measures the frame path alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

ROOT = Path(__file__).resolve().parent.parent


class Echo(WSListener):  # type: ignore[misc]
    """One closed-loop client."""

    def __init__(self, payload: bytes, counter: list[int]) -> None:
        self.payload = payload
        self.counter = counter
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.send(WSMsgType.TEXT, self.payload)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.counter[0] += 1
            transport.send(WSMsgType.TEXT, self.payload)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def generate(
    url: str, connections: int, size: int, seconds: float, pid: int
) -> dict[str, float]:
    """Messages per second echoed by the server at ``url``, and per server CPU second."""
    counter = [0]
    payload = b"x" * size
    clients = [await ws_connect(lambda: Echo(payload, counter), url) for _ in range(connections)]
    await asyncio.sleep(0.5)  # warm-up
    start_count, start, start_cpu = counter[0], time.perf_counter(), cpu_seconds(pid)
    await asyncio.sleep(seconds)
    replies = counter[0] - start_count
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(pid) - start_cpu
    for transport, _ in clients:
        transport.disconnect()
    return {"per_s": replies / elapsed, "per_cpu_s": replies / cpu if cpu else 0.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def commands(port: int) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "wsserver frame layer (asyncio)": [py, "-m", "tests.conformance.echo_server",
                                           "--port", str(port)],
        "wsserver frame layer (uvloop)": [py, "-m", "tests.conformance.echo_server",
                                          "--port", str(port), "--uvloop"],
        "tornado": [py, "-m", "bench.echo.tornado_echo", "--port", str(port)],
        "uvicorn[standard]": [py, "-m", "uvicorn", "bench.echo.uvicorn_echo:app",
                              "--host", "127.0.0.1", "--port", str(port), "--log-level",
                              "warning"],
    }


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    """One run of the server called ``name``."""
    port = free_port()
    cmd = ["taskset", "-c", "0", *commands(port)[name]]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL) as server:
        try:
            wait_listening(port, server)
            out = subprocess.run(
                [sys.executable, "-m", "bench.raw_echo", "--generate",
                 f"ws://127.0.0.1:{port}/", "--pid", str(server.pid),
                 "--seconds", str(args.seconds),
                 "--connections", str(args.connections), "--size", str(args.size)],
                cwd=ROOT, check=True, capture_output=True, text=True,
            ).stdout
            result: dict[str, float] = json.loads(out)
            return result
        finally:
            server.terminate()
            server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--generate", help=argparse.SUPPRESS)  # internal: the client side
    parser.add_argument("--pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        os.sched_setaffinity(0, {1})
        result = asyncio.run(
            generate(args.generate, args.connections, args.size, args.seconds, args.pid)
        )
        print(json.dumps(result))
        return
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in commands(0)}
    for _ in range(args.rounds):
        for name in runs:
            runs[name].append(measure(name, args))
            got = runs[name][-1]
            print(f"  {name:32} {got['per_s']:8.0f} msg/s {got['per_cpu_s']:8.0f} msg/CPU-s",
                  flush=True)
    results = {
        name: {key: statistics.median(run[key] for run in got) for key in got[0]}
        for name, got in runs.items()
    }
    print(f"median of {args.rounds} rounds:")
    for name, got in results.items():
        print(f"  {name:32} {got['per_s']:8.0f} msg/s {got['per_cpu_s']:8.0f} msg/CPU-s")
    for key in ("per_s", "per_cpu_s"):
        base = results["uvicorn[standard]"][key]
        tornado = results["tornado"][key]
        print(f"ratios of {key}:")
        for name, got in results.items():
            rate = got[key]
            print(f"  {name:32} {rate / base:5.2f}x uvicorn  {rate / tornado:5.2f}x tornado")


if __name__ == "__main__":
    main()
