"""The load generator: picows clients in a process of their own.

``python -m bench.loadgen`` reads one JSON job (one line) from stdin, pins
itself to the CPUs the job names, runs the job's scenario against
``job["url"]`` and prints one JSON result on stdout. The ``hold`` job of the
100k scenario prints a ``ready`` line first and then reads one command line;
the permessage-deflate jobs are in :mod:`bench.compression` (on the raw
client of :mod:`bench.wire`, since picows cannot inflate). The orchestrator (:mod:`bench.runner`) starts it
once per scenario and server, so the clients never share a core or an
interpreter with the server they measure.

picows parses frames in C and calls :meth:`WSListener.on_ws_frame`
synchronously, with no future or task per frame: one generator process keeps
up with several times what a Python server on one core can answer.

When the job carries ``jwt_user``, every connection sends
``Authorization: Bearer <token>`` with an HS256 token signed by the secret in
the ``BENCH_JWT_SECRET`` environment variable (kept out of argv, so out of
``ps``). The ``idle`` job signs its tokens before it starts the clock: a
client has its token already, and signing it (some 20 µs here) would
otherwise slow the one generator down in wsserver's rounds only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import resource
import signal
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import jwt
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench import compression
from bench.meters import CpuMeter, publish_run, read_rss_kib

Job = dict[str, Any]
C = TypeVar("C", bound="Connection")
Result = dict[str, Any]

#: Open handshakes at once. The server's listen backlog is 128 (Tornado's
#: default); more concurrent SYNs than that would measure SYN retries.
CONNECT_CONCURRENCY = 64


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentiles_ms(samples_ns: Sequence[int]) -> dict[str, float | None]:
    """p50, p99 and max of nanosecond samples, in milliseconds (nearest rank)."""
    if not samples_ns:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples_ns)

    def rank(q: float) -> float:
        index = min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))
        return ordered[index] / 1e6

    return {"p50_ms": rank(0.50), "p99_ms": rank(0.99), "max_ms": ordered[-1] / 1e6}


class Connection(WSListener):
    """One client connection: waits for ``welcome``, then hands messages on.

    Subclasses override :meth:`on_message` (or :meth:`on_payload`, to skip
    decoding). A close frame from the server is recorded (benchmarks must not
    hide a 4009 or 4029) and answered.
    """

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.welcome: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.closing = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            if self.welcome.done():
                self.on_payload(frame.get_payload_as_bytes())
                return
            msg = json.loads(frame.get_payload_as_bytes())
            if msg.get("type") == "welcome":
                self.welcome.set_result(msg)
            else:
                self.welcome.set_exception(RuntimeError(f"first message was not welcome: {msg}"))
        elif frame.msg_type == WSMsgType.CLOSE:
            if self.closing:
                transport.disconnect()
                return
            self.close_code = frame.get_close_code().value
            if not self.welcome.done():
                self.welcome.set_exception(RuntimeError(f"closed {self.close_code} before welcome"))
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("disconnected before welcome"))

    def on_payload(self, payload: bytes) -> None:
        """A text frame after the welcome; decoded and handed to :meth:`on_message`."""
        self.on_message(json.loads(payload))

    def on_message(self, msg: dict[str, Any]) -> None:
        """A server message after the welcome."""

    def send(self, msg: dict[str, Any] | bytes) -> None:
        payload = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, payload)

    async def close(self) -> None:
        """Close politely and wait until the TCP connection is gone."""
        if self.transport is None or self.transport.is_disconnected:
            return
        self.closing = True
        # 1000: picows's default (NO_INFO) puts code 0 on the wire, which a
        # server must answer with 1002.
        self.transport.send_close(WSCloseCode.OK)
        try:
            await asyncio.wait_for(self.transport.wait_disconnected(), 5)
        except TimeoutError:
            self.transport.disconnect(graceful=False)


@dataclass
class Dialer:
    """Opens connections to one URL, spread over several loopback source addresses.

    Each source address has its own ~28k ephemeral ports, so 10k connections
    per server (and their TIME_WAIT leftovers) never run a port range dry.
    """

    url: str
    jwt_user: str | None
    source_addresses: Sequence[str]
    #: More handshake headers (a session cookie, for the connect proxy).
    extra_headers: dict[str, str] = field(default_factory=dict)
    #: For ``wss://``: the CA file that verifies the server (None: the system's).
    cafile: str | None = None
    _secret: str = field(default_factory=lambda: os.environ.get("BENCH_JWT_SECRET", ""))
    _sources: Iterator[str] = field(init=False)
    _serial: Iterator[int] = field(default_factory=itertools.count)
    #: Headers with tokens signed ahead (:meth:`mint_ahead`), used first.
    _minted: deque[dict[str, str]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._sources = itertools.cycle(self.source_addresses or ["127.0.0.1"])
        self._ssl = (
            ssl.create_default_context(cafile=self.cafile) if self.url.startswith("wss:") else None
        )

    def next_source(self) -> str:
        """The next source address, round robin."""
        return next(self._sources)

    def mint_ahead(self, count: int) -> None:
        """Sign the tokens of the next ``count`` connections now: signing is the
        client's work, not the server's, and kept out of a timed connect."""
        if self.jwt_user is not None:
            self._minted.extend(self._mint() for _ in range(count))

    def headers(self) -> dict[str, str]:
        """The handshake headers: a bearer token for wsserver, none for the others
        (plus the job's ``extra_headers``)."""
        if self.jwt_user is None:
            return dict(self.extra_headers)
        if self._minted:
            return self._minted.popleft()
        return self._mint()

    def _mint(self) -> dict[str, str]:
        # Grants for every room: the fan-out scenario joins and publishes.
        claims = {"sub": f"{self.jwt_user}-{next(self._serial)}", "exp": int(time.time()) + 3600,
                  "rooms": ["*"], "publish": ["*"]}
        token = jwt.encode(claims, self._secret, algorithm="HS256")
        return {**self.extra_headers, "Authorization": "Bearer " + token}

    async def connect(self, factory: Callable[[], C]) -> C:
        """One connection, returned once the server's welcome has arrived."""
        _, listener = await ws_connect(
            factory,
            self.url,
            extra_headers=self.headers(),
            local_addr=(self.next_source(), 0),
            ssl_context=self._ssl,
            websocket_handshake_timeout=30,
        )
        assert isinstance(listener, Connection)
        await listener.welcome
        return listener  # type: ignore[return-value]

    async def connect_many(
        self, count: int, factory: Callable[[], C], latencies_ns: list[int] | None = None
    ) -> list[C]:
        """``count`` connections, at most :data:`CONNECT_CONCURRENCY` handshakes at once."""
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one() -> C:
            async with gate:
                started = time.perf_counter_ns()
                conn = await self.connect(factory)
                if latencies_ns is not None:
                    latencies_ns.append(time.perf_counter_ns() - started)
                return conn

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def close_all(conns: Sequence[Connection]) -> None:
    await asyncio.gather(*(conn.close() for conn in conns))


def close_codes(conns: Sequence[Connection]) -> dict[str, int]:
    """Close codes the server sent, counted (empty when it closed nobody)."""
    codes: dict[str, int] = {}
    for conn in conns:
        if conn.close_code is not None:
            codes[str(conn.close_code)] = codes.get(str(conn.close_code), 0) + 1
    return codes


# --- echo --------------------------------------------------------------------


@dataclass
class EchoRun:
    """State shared by the echo connections of one run."""

    data: Any
    running: bool = True
    measuring: bool = False
    replies: int = 0
    errors: int = 0
    first_error: Any = None
    latencies_ns: list[int] = field(default_factory=list)


class EchoConnection(Connection):
    """Closed loop: send an echo, wait for it, send the next."""

    def __init__(self, run: EchoRun, payload: bytes) -> None:
        super().__init__()
        self.run = run
        self.payload = payload
        self.sent_at = 0

    def fire(self) -> None:
        self.sent_at = time.perf_counter_ns()
        self.send(self.payload)

    def on_message(self, msg: dict[str, Any]) -> None:
        now = time.perf_counter_ns()
        run = self.run
        if msg.get("type") != "echo" or msg.get("data") != run.data:
            run.errors += 1
            run.first_error = run.first_error or msg
        elif run.measuring:
            run.replies += 1
            run.latencies_ns.append(now - self.sent_at)
        if run.running:
            self.fire()


async def echo(job: Job, dialer: Dialer) -> Result:
    """``connections`` clients in a closed loop; replies/s and round-trip latency."""
    data = {"seq": 1, "text": "hello from the benchmark"}
    payload = json.dumps({"type": "echo", "data": data}).encode()
    run = EchoRun(data)
    conns = await dialer.connect_many(job["connections"], lambda: EchoConnection(run, payload))
    for conn in conns:
        conn.fire()
    await asyncio.sleep(job["warmup"])
    meter = CpuMeter.for_job(job)
    meter.start()
    run.measuring = True
    started = time.perf_counter()
    await asyncio.sleep(job["duration"])
    run.measuring = False
    elapsed = time.perf_counter() - started
    cpu = meter.stop(run.replies)
    run.running = False
    await close_all(conns)
    return {
        "connections": len(conns),
        "seconds": elapsed,
        "replies": run.replies,
        "messages_per_s": run.replies / elapsed,
        **percentiles_ms(run.latencies_ns),
        **cpu,
        "errors": run.errors,
        "first_error": run.first_error,
        "close_codes": close_codes(conns),
    }


# --- idle --------------------------------------------------------------------


async def idle(job: Job, dialer: Dialer) -> Result:
    """Open ``connections`` idle connections; connects/s and server RSS per connection.

    The server's RSS is read after a warm-up batch has been opened and closed
    (so one-off start-up allocations are not charged to connections) and again
    once every connection has received its welcome.
    """
    pid = job["server_pid"]
    warm = await dialer.connect_many(job["warmup_connections"], Connection)
    await close_all(warm)
    rss_before = read_rss_kib(pid)
    handshake_ns: list[int] = []
    dialer.mint_ahead(job["connections"])
    meter = CpuMeter([pid], job.get("redis_pid"))
    meter.start()
    started = time.perf_counter()
    conns = await dialer.connect_many(job["connections"], Connection, handshake_ns)
    elapsed = time.perf_counter() - started
    cpu = meter.stop(len(conns))
    rss_after = read_rss_kib(pid)
    # The connections must still be open when the memory is read.
    still_open = sum(
        1 for c in conns if c.transport is not None and not c.transport.is_disconnected
    )
    await close_all(conns)
    count = len(conns)
    return {
        "connections": count,
        "still_open": still_open,
        "seconds": elapsed,
        "connects_per_s": count / elapsed,
        "handshake": percentiles_ms(handshake_ns),
        **cpu,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "kib_per_connection": (rss_after - rss_before) / count,
        "close_codes": close_codes(conns),
    }


# --- fan-out -----------------------------------------------------------------


@dataclass
class FanoutRun:
    """State shared by the members of one fan-out run."""

    members: int
    publishes: int
    window: int
    room: str = "bench"
    delivered: int = 0
    errors: int = 0
    first_error: Any = None
    sent: int = 0
    sent_at_ns: list[int] = field(default_factory=list)
    arrivals: list[int] = field(default_factory=list)
    complete_ns: list[int] = field(default_factory=list)
    last_delivery_ns: int = 0
    #: Frame payload -> publish number, filled from the first copy of each.
    seen: dict[bytes, int] = field(default_factory=dict)
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def __post_init__(self) -> None:
        self.arrivals = [0] * self.publishes
        self.complete_ns = [0] * self.publishes


class Member(Connection):
    """A room member: checks it gets every publish, once and in order."""

    def __init__(self, run: FanoutRun) -> None:
        super().__init__()
        self.run = run
        self.next_seq = 0
        self.publisher = False
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_payload(self, payload: bytes) -> None:
        # Every member gets the same bytes for one publish: parse them once
        # per publish, not once per delivery, so the generator stays cheap.
        run = self.run
        seq = run.seen.get(payload)
        if seq is None:
            msg = json.loads(payload)
            kind = msg.get("type")
            if kind == "joined":
                self.joined.set_result(None)
                return
            data = msg.get("data")
            seq = data.get("seq") if kind == "message" and isinstance(data, dict) else None
            if not isinstance(seq, int) or msg.get("room") != run.room:
                run.errors += 1
                run.first_error = run.first_error or msg
                return
            run.seen[payload] = seq
        self.delivered(seq)

    def delivered(self, seq: int) -> None:
        """Publish ``seq`` reached this member: it must be the next one expected."""
        run = self.run
        if seq != self.next_seq:
            run.errors += 1
            run.first_error = run.first_error or {"expected": self.next_seq, "got": seq}
            return
        self.next_seq += 1
        now = time.perf_counter_ns()
        run.delivered += 1
        run.last_delivery_ns = now
        run.arrivals[seq] += 1
        if run.arrivals[seq] == run.members:
            run.complete_ns[seq] = now - run.sent_at_ns[seq]
        if self.publisher and run.sent < run.publishes:
            # The window moves on the publisher's own copy arriving: at most
            # ``window`` publishes are in flight, so buffers stay bounded.
            self.publish()
        if run.delivered == run.members * run.publishes and not run.done.done():
            run.done.set_result(None)

    def publish(self) -> None:
        run = self.run
        run.sent_at_ns.append(time.perf_counter_ns())
        self.send({"type": "publish", "room": run.room, "data": {"seq": run.sent}})
        run.sent += 1


class Churner(Connection):
    """A short-lived member: joins the room, and is closed once it got its ``joined``."""

    def __init__(self) -> None:
        super().__init__()
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "joined" and not self.joined.done():
            self.joined.set_result(None)


async def churn(dialer: Dialer, room: str, rate: float, stop: asyncio.Event) -> int:
    """Connect, join ``room`` and close, ``rate`` times a second until ``stop``; how many.

    Each joiner's history read races the room's live messages (the join race of
    issue 19): the members' deliveries must not suffer from it.
    """
    count = 0
    pending: set[asyncio.Task[None]] = set()

    async def one() -> None:
        conn = await dialer.connect(Churner)
        conn.send({"type": "join", "room": room})
        await asyncio.wait_for(conn.joined, 30)
        await conn.close()

    while not stop.is_set():
        task = asyncio.ensure_future(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
        count += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1 / rate)
    if pending:
        await asyncio.gather(*pending)
    return count


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` counts that differ by at most one, the larger ones first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def fanout(job: Job, dialer: Dialer) -> Result:
    """``members`` in one room; one of them publishes ``publishes`` messages.

    With ``urls`` (several nodes sharing a broker) the members are split
    evenly across the nodes and the publisher is on the first one.
    """
    run = FanoutRun(job["members"], job["publishes"], job["window"], job.get("room", "bench"))
    urls = job.get("urls") or [dialer.url]
    dialers = [dialer] + [
        Dialer(url, dialer.jwt_user, dialer.source_addresses, dialer.extra_headers, dialer.cafile)
        for url in urls[1:]
    ]
    conns: list[Member] = []
    for node_dialer, count in zip(dialers, split(run.members, len(dialers)), strict=True):
        conns += await node_dialer.connect_many(count, lambda: Member(run))
    for conn in conns:
        conn.send({"type": "join", "room": run.room})
    await asyncio.gather(*(conn.joined for conn in conns))
    publisher = conns[0]
    publisher.publisher = True
    stop_churn = asyncio.Event()
    churning = None
    if job.get("churn"):
        churning = asyncio.ensure_future(churn(dialer, run.room, job["churn"], stop_churn))
    elapsed, cpu, timed_out = await publish_run(run, publisher, job)
    stop_churn.set()
    churned = await churning if churning is not None else 0
    expected = run.members * run.publishes
    await close_all(conns)
    return {
        "room": run.room,
        "nodes": len(urls),
        "members": run.members,
        "publishes": run.publishes,
        "window": run.window,
        "churned": churned,
        "expected": expected,
        "delivered": run.delivered,
        "all_delivered": run.delivered == expected and run.errors == 0,
        "timed_out": timed_out,
        "seconds": elapsed,
        "deliveries_per_s": run.delivered / elapsed if run.delivered else 0.0,
        **cpu,
        "publish_to_last_member": percentiles_ms([ns for ns in run.complete_ns if ns]),
        "errors": run.errors,
        "first_error": run.first_error,
        "close_codes": close_codes(conns),
    }


# --- recovery on join ----------------------------------------------------------


class Inbox(Connection):
    """Queues every server message, for scenarios that wait for one answer at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_message(self, msg: dict[str, Any]) -> None:
        self.inbox.put_nowait(msg)

    async def expect(self, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        """The next message of type ``kind``; an ``error`` on the way raises."""
        while True:
            msg = await asyncio.wait_for(self.inbox.get(), timeout)
            if msg.get("type") == kind:
                return msg
            if msg.get("type") == "error":
                raise RuntimeError(f"waiting for {kind!r}, got {msg}")


def recovery_problem(joined: dict[str, Any], room: str, after: int, count: int) -> Any:
    """What is wrong with a ``joined`` answer that should recover ``count`` messages, or None.

    They must be the room's messages ``after + 1`` ... ``after + count``, in
    order, each a full ``message`` with the publish number it was sent with.
    """
    messages = joined.get("messages")
    if joined.get("recovered") is not True or not isinstance(messages, list):
        return {"recovered": joined.get("recovered"), "top": joined.get("offset")}
    if len(messages) != count:
        return {"expected": count, "recovered_count": len(messages)}
    for n, msg in enumerate(messages):
        data = msg.get("data")
        if (
            msg.get("type") != "message" or msg.get("room") != room
            or msg.get("offset") != after + n + 1
            or not isinstance(data, dict) or data.get("seq") != n
        ):  # fmt: skip
            return {"at": n, "message": msg}
    return None


async def recover(job: Job, dialer: Dialer) -> Result:
    """Publish ``messages`` into a history room, then time fresh joins with ``since``.

    A publisher joins the room (a plain join answers its ``epoch`` and top
    offset), publishes ``messages`` messages (``window`` in flight) and waits
    for its own copy of each. Then ``joins`` times, alternately: a fresh connection joins with
    ``{"since": {"offset": TOP, "epoch": E}}`` and the time from sending the
    join to its ``joined`` answer (with every message) is recorded; and a
    fresh connection joins without ``since``, the same way, for comparison.
    The connections' handshakes are not timed.
    """
    room, count = job["room"], job["messages"]
    publisher = await dialer.connect(Inbox)
    publisher.send({"type": "join", "room": room})
    joined = await publisher.expect("joined")
    epoch, after = joined["epoch"], joined["offset"]
    # At most ``window`` publishes in flight (the next goes out when the
    # publisher's own copy of an earlier one arrives): the server ends a
    # connection that queues too many messages behind the broker.
    sent = 0
    for _ in range(min(job["window"], count)):
        publisher.send({"type": "publish", "room": room, "data": {"seq": sent}})
        sent += 1
    for _ in range(count):
        await publisher.expect("message")
        if sent < count:
            publisher.send({"type": "publish", "room": room, "data": {"seq": sent}})
            sent += 1
    recover_ns: list[int] = []
    plain_ns: list[int] = []
    counts: list[int] = []
    errors = 0
    first_error: Any = None
    conns: list[Connection] = [publisher]
    for _ in range(job["joins"]):
        for since in (True, False):
            conn = await dialer.connect(Inbox)
            conns.append(conn)
            request: dict[str, Any] = {"type": "join", "room": room}
            if since:
                request["since"] = {"offset": after, "epoch": epoch}
            started = time.perf_counter_ns()
            conn.send(request)
            answer = await conn.expect("joined")
            elapsed = time.perf_counter_ns() - started
            if since:
                recover_ns.append(elapsed)
                counts.append(len(answer.get("messages") or []))
                problem = recovery_problem(answer, room, after, count)
                if problem is not None:
                    errors += 1
                    first_error = first_error or problem
            else:
                plain_ns.append(elapsed)
            await conn.close()
    await publisher.close()
    return {
        "room": room,
        "messages": count,
        "epoch": epoch,
        "joins": len(recover_ns),
        "recovered_counts": counts,
        "all_recovered": errors == 0 and counts == [count] * len(counts),
        "recover": percentiles_ms(recover_ns),
        "recover_ms": [ns / 1e6 for ns in recover_ns],
        "plain_join": percentiles_ms(plain_ns),
        "errors": errors,
        "first_error": first_error,
        "close_codes": close_codes(conns),
    }


# --- loop under load ---------------------------------------------------------


class Pinger(Connection):
    """Sends a ping with an ``id`` on a fixed schedule and times each pong.

    Open loop: the next ping goes out on time whether or not the last one was
    answered, so a stalled server shows up as many slow pings rather than as
    one (the "coordinated omission" a wait-then-send loop would commit).
    """

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, int] = {}
        self.latencies_ns: list[int] = []
        self.drained: asyncio.Event = asyncio.Event()

    def on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "pong":
            started = self.pending.pop(msg.get("id"), None)  # type: ignore[arg-type]
            if started is not None:
                self.latencies_ns.append(time.perf_counter_ns() - started)
            if not self.pending:
                self.drained.set()

    def ping(self, serial: int) -> None:
        self.drained.clear()
        self.pending[serial] = time.perf_counter_ns()
        self.send(b'{"type":"ping","id":%d}' % serial)

    def give_up(self) -> int:
        """Count the unanswered pings as answered now (a lower bound); how many there were."""
        now = time.perf_counter_ns()
        self.latencies_ns.extend(now - started for started in self.pending.values())
        count = len(self.pending)
        self.pending.clear()
        return count


@dataclass
class TaskLoad:
    """State shared by the connections that keep the task pool busy."""

    task: dict[str, Any]
    running: bool = True
    results: int = 0
    busy: int = 0
    errors: int = 0
    first_error: Any = None


class Tasker(Connection):
    """Keeps ``in_flight`` tasks outstanding, resubmitting as each answer comes."""

    def __init__(self, load: TaskLoad) -> None:
        super().__init__()
        self.load = load
        self.payload = json.dumps({"type": "task", **load.task}).encode()

    def on_message(self, msg: dict[str, Any]) -> None:
        load = self.load
        if msg.get("type") == "result":
            load.results += 1
        elif msg.get("code") == "busy":
            # The queue is full: the pool is saturated, which is the point.
            load.busy += 1
            if load.running:
                asyncio.get_running_loop().call_later(0.01, self.submit)
            return
        else:
            load.errors += 1
            load.first_error = load.first_error or msg
        if load.running:
            self.submit()

    def submit(self) -> None:
        if self.load.running and self.transport is not None and not self.transport.is_disconnected:
            self.send(self.payload)


async def loop_latency(job: Job, dialer: Dialer) -> Result:
    """A ping every ``interval`` seconds while ``taskers`` keep tasks in flight."""
    load = TaskLoad(job["task"])
    taskers = await dialer.connect_many(job["taskers"], lambda: Tasker(load))
    pinger = await dialer.connect(Pinger)
    for tasker in taskers:
        for _ in range(job["in_flight"]):
            tasker.submit()
    await asyncio.sleep(job["warmup"])
    results_before = load.results
    loop = asyncio.get_running_loop()
    started = loop.time()
    count = int(job["duration"] / job["interval"])
    for serial in range(count):
        await asyncio.sleep(max(0.0, started + serial * job["interval"] - loop.time()))
        pinger.ping(serial)
    load.running = False
    tasks_done = load.results - results_before
    elapsed = loop.time() - started
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(pinger.drained.wait(), job["grace"])
    unanswered = pinger.give_up()
    conns: list[Connection] = [*taskers, pinger]
    await close_all(conns)
    return {
        "pings": count,
        "unanswered_after_grace": unanswered,
        "seconds": elapsed,
        **percentiles_ms(pinger.latencies_ns),
        "task": job["task"],
        "taskers": len(taskers),
        "tasks_completed": tasks_done,
        "tasks_per_s": tasks_done / elapsed,
        "busy_answers": load.busy,
        "errors": load.errors,
        "first_error": load.first_error,
        "close_codes": close_codes(conns),
    }




# --- drain: reconnects during a rolling deploy ----------------------------------

#: What static/wsclient.js waits before it reconnects (ms): after 1001 a random
#: delay in [0, SOON_MS); after 1012 (and 1006) the first backoff window
#: [0, BACKOFF_BASE_MS), each with full jitter.
SOON_MS = 1000
BACKOFF_BASE_MS = 500
#: The histogram's bucket: reconnects per this many seconds.
BUCKET = 0.1


class Drained(Connection):
    """A client of the node being stopped: notes when and how it was closed."""

    def __init__(self, closed: Callable[[Drained], None]) -> None:
        super().__init__()
        self._closed = closed
        self.closed_at: float | None = None

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        super().on_ws_disconnected(transport)
        if self.closed_at is None and self.welcome.done():
            self.closed_at = time.perf_counter()
            self._closed(self)


async def drain(job: Job, dialer: Dialer) -> Result:
    """``connections`` clients on the draining node; SIGTERM it; each client
    reconnects to the next node (``job["url"]``) as wsclient.js would after its
    close code. The peak reconnects per 100 ms is what the next node must absorb.
    """
    draining = Dialer(job["draining_url"], job.get("jwt_user"), job.get("source_addresses", []))
    loop = asyncio.get_running_loop()
    moved: list[Connection] = []
    reconnected_at: list[float] = []
    handshake_ns: list[int] = []
    failures: list[str] = []
    all_back = loop.create_future()
    count = job["connections"]
    start = 0.0

    async def reconnect(code: int | None) -> None:
        window = SOON_MS if code == 1001 else BACKOFF_BASE_MS
        await asyncio.sleep(random.random() * window / 1000)
        began = time.perf_counter_ns()
        try:
            moved.append(await dialer.connect(Connection))
        except Exception as exc:  # counted, not raised: the figure must show it
            failures.append(f"{type(exc).__name__}: {exc}")
        else:
            handshake_ns.append(time.perf_counter_ns() - began)
            reconnected_at.append(time.perf_counter() - start)
        if len(reconnected_at) + len(failures) == count and not all_back.done():
            all_back.set_result(None)

    pending: set[asyncio.Task[None]] = set()

    def closed(conn: Drained) -> None:
        task = loop.create_task(reconnect(conn.close_code))
        pending.add(task)
        task.add_done_callback(pending.discard)

    conns = await draining.connect_many(count, lambda: Drained(closed))
    start = time.perf_counter()
    os.kill(job["draining_pid"], signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_back, job["timeout"])
    closes = sorted(c.closed_at - start for c in conns if c.closed_at is not None)
    buckets: dict[int, int] = {}
    for t in reconnected_at:
        buckets[int(t / BUCKET)] = buckets.get(int(t / BUCKET), 0) + 1
    await close_all(moved)
    return {
        "connections": count,
        "close_codes": close_codes(conns),
        "closed": len(closes),
        "first_close_s": closes[0] if closes else None,
        "last_close_s": closes[-1] if closes else None,
        "reconnected": len(reconnected_at),
        "failed": len(failures),
        "first_failure": failures[0] if failures else None,
        "last_reconnect_s": max(reconnected_at, default=None),
        "peak_reconnects_per_100ms": max(buckets.values(), default=0),
        "reconnects_per_100ms": [buckets.get(i, 0) for i in range(max(buckets, default=-1) + 1)],
        "handshake_on_next_node": percentiles_ms(handshake_ns),
    }


# --- hold: many connections kept open for the orchestrator (the 100k scenario) ---


@dataclass
class HoldRun:
    """Deliveries counted by the room members of one ``hold`` job."""

    room: str
    delivered: int = 0
    #: Joins answered ``unavailable`` (the broker was busy) and sent again.
    join_retries: int = 0
    errors: int = 0
    first_error: Any = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


#: A join answered ``unavailable`` is sent again this often at most, a second apart.
JOIN_ATTEMPTS = 30


class Holder(Connection):
    """An idle connection; as a room member, counts the room's messages."""

    def __init__(self, run: HoldRun) -> None:
        super().__init__()
        self.run = run
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.received = 0
        self.attempts = 0

    def join(self) -> None:
        self.attempts += 1
        self.send({"type": "join", "room": self.run.room})

    def on_payload(self, payload: bytes) -> None:
        # Idle connections hear nothing but their ``joined`` and the publishes.
        msg = json.loads(payload)
        kind = msg.get("type")
        run = self.run
        if kind == "joined" and not self.joined.done():
            self.joined.set_result(None)
        elif kind == "message":
            self.received += 1
            run.delivered += 1
            run.changed.set()
        elif (kind == "error" and msg.get("code") == "unavailable" and not self.joined.done()
              and self.attempts < JOIN_ATTEMPTS):  # fmt: skip
            # What a client does when the broker is busy: try again a little later.
            run.join_retries += 1
            asyncio.get_running_loop().call_later(1.0, self.join)
        else:
            run.errors += 1
            run.first_error = run.first_error or msg
            if not self.joined.done():
                self.joined.set_exception(RuntimeError(f"join answered {msg}"))


async def read_command() -> dict[str, Any]:
    """The orchestrator's next line on stdin, as JSON (``{}`` at end of input)."""
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return json.loads(line) if line.strip() else {}


def emit(result: Result) -> None:
    """One JSON line to the orchestrator."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


async def hold(job: Job, dialer: Dialer) -> Result:
    """Open ``connections`` (``members`` of them join ``room``), report, then wait for orders.

    Prints a ``{"ready": ...}`` line once every connection has its welcome
    and every member its ``joined``; then reads one command line:
    ``{"expect": N}`` (N publishes were made into the room: wait up to
    ``timeout`` seconds until every member has N of them) or ``{}`` (close).
    The last line, returned, is the delivery count and what is still open.
    """
    run = HoldRun(job["room"])
    handshake_ns: list[int] = []
    started = time.time()
    conns = await dialer.connect_many(job["connections"], lambda: Holder(run), handshake_ns)
    finished = time.time()
    members = conns[: job["members"]]
    for conn in members:
        conn.join()
    await asyncio.wait_for(asyncio.gather(*(c.joined for c in members)), job["timeout"])
    emit({"ready": True, "connections": len(conns), "members": len(members),
          "join_retries": run.join_retries,
          "started": started, "finished": finished, "handshake": percentiles_ms(handshake_ns),
          "generator_max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})  # fmt: skip
    command = await read_command()
    expect = int(command.get("expect", 0))
    waited_from = time.perf_counter()
    deadline = waited_from + job["timeout"]
    while run.delivered < expect * len(members) and time.perf_counter() < deadline:
        run.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.changed.wait(), deadline - time.perf_counter())
    delivery_s = time.perf_counter() - waited_from
    still_open = sum(1 for c in conns if c.transport is not None and not c.transport.is_disconnected)
    await close_all(conns)
    return {
        "connections": len(conns),
        "members": len(members),
        "expected": expect * len(members),
        "delivered": run.delivered,
        "members_complete": sum(1 for c in members if c.received == expect),
        "delivery_seconds": delivery_s,
        "join_retries": run.join_retries,
        "still_open": still_open,
        "errors": run.errors,
        "first_error": run.first_error,
        "close_codes": close_codes(conns),
    }


# --- HTTP streaming (issue 22) -------------------------------------------------------


class SseStream(asyncio.Protocol):
    """One ``GET /sse`` read raw: the response head, its chunks, its events.

    A Python protocol with no Future per event, as picows is for frames: the
    head is checked, chunked transfer encoding undone, each event's ``data``
    taken whole (the server writes one line per event) and, after the
    ``welcome``, handed to ``on_payload``. Keepalive comments are skipped.
    """

    def __init__(self, request: bytes, on_payload: Callable[[bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        self.request = request
        self.on_payload = on_payload
        self.welcome: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.gone: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self._head = True
        self._raw = bytearray()
        self._events = bytearray()
        self._data_left = 0  # bytes of the current chunk still to come
        self._crlf_left = 0  # bytes of the CRLF after it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("stream ended before its welcome"))
        if not self.gone.done():
            self.gone.set_result(None)

    def data_received(self, data: bytes) -> None:
        raw = self._raw
        raw += data
        if self._head:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(raw[: raw.find(b"\r\n")])
            if b" 200 " not in status:
                if not self.welcome.done():
                    self.welcome.set_exception(RuntimeError(f"stream refused: {status!r}"))
                self.close()
                return
            del raw[: end + 4]
            self._head = False
        events = self._events
        while raw:
            if self._crlf_left:
                taken = min(self._crlf_left, len(raw))
                del raw[:taken]
                self._crlf_left -= taken
                continue
            if not self._data_left:
                line_end = raw.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(bytes(raw[:line_end]), 16)
                del raw[: line_end + 2]
                if size == 0:
                    self.close()  # the last chunk: the stream ended
                    return
                self._data_left = size
            taken = min(self._data_left, len(raw))
            events += raw[:taken]
            del raw[:taken]
            self._data_left -= taken
            if not self._data_left:
                self._crlf_left = 2
        start = 0
        while (end := events.find(b"\n\n", start)) >= 0:
            block = bytes(events[start:end])
            start = end + 2
            if block.startswith(b"data: "):
                self._event(block[6:])
        del events[:start]

    def _event(self, payload: bytes) -> None:
        if not self.welcome.done():
            msg = json.loads(payload)
            if msg.get("type") == "welcome":
                self.welcome.set_result(msg)
            else:
                self.welcome.set_exception(RuntimeError(f"first event was not welcome: {msg}"))
            return
        if payload.startswith(b'{"type":"close"'):
            self.close_code = json.loads(payload)["code"]
            return
        self.on_payload(payload)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _host_port(url: str) -> tuple[str, int]:
    """Host and port of a ``ws://host:port/ws`` URL."""
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    host, port = netloc.rsplit(":", 1)
    return host, int(port)


async def open_streams(
    dialer: Dialer, count: int, on_payload: Callable[[int], Callable[[bytes], None]],
    latencies_ns: list[int] | None = None,
) -> list[SseStream]:
    """``count`` streams past their welcome; ``on_payload(i)`` receives the i-th's events."""
    host, port = _host_port(dialer.url)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(index: int) -> SseStream:
        headers = "".join(f"{k}: {v}\r\n" for k, v in dialer.headers().items())
        request = (f"GET /sse HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
                   f"{headers}\r\n").encode()
        async with gate:
            started = time.perf_counter_ns()
            _, stream = await loop.create_connection(
                lambda: SseStream(request, on_payload(index)), host, port,
                local_addr=(dialer.next_source(), 0),
            )
            await stream.welcome
            if latencies_ns is not None:
                latencies_ns.append(time.perf_counter_ns() - started)
        return stream

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def stream_send(dialer: Dialer, session: str, message: dict[str, Any]) -> int:
    """``POST /sse/send`` of one message on a connection of its own; the status."""
    host, port = _host_port(dialer.url)
    body = json.dumps(message).encode()
    reader, writer = await asyncio.open_connection(host, port,
                                                   local_addr=(dialer.next_source(), 0))
    writer.write(b"POST /sse/send HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                 b"X-Session: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                 % (host.encode(), port, session.encode(), len(body), body))
    status = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return int(status.split()[1])


async def close_streams(streams: Sequence[SseStream]) -> None:
    for stream in streams:
        stream.close()
    await asyncio.gather(*(stream.gone for stream in streams))


async def stream_fanout(job: Job, dialer: Dialer) -> Result:
    """``members`` room members over ``transport`` (``sse`` or ``websocket``) and one
    WebSocket publisher, also a member, whose own copies move its window.

    The same room, the same publisher and the same checks as ``fanout``
    (every publish to every member, once, in order), so the two transports'
    runs compare like with like.
    """
    transport = job["transport"]
    members = job["members"]
    run = FanoutRun(members + 1, job["publishes"], job["window"], job.get("room", "bench"))
    publisher = await dialer.connect(lambda: Member(run))
    publisher.publisher = True
    streams: list[SseStream] = []
    if transport == "websocket":
        conns = await dialer.connect_many(members, lambda: Member(run))
        for conn in conns:
            conn.send({"type": "join", "room": run.room})
    else:
        conns = [Member(run) for _ in range(members)]
        streams = await open_streams(dialer, members, lambda i: conns[i].on_payload)
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def join(stream: SseStream) -> None:
            async with gate:
                status = await stream_send(dialer, (await stream.welcome)["session"],
                                           {"type": "join", "room": run.room})
            if status != 202:
                raise RuntimeError(f"join over /sse/send answered {status}")

        await asyncio.gather(*(join(stream) for stream in streams))
    publisher.send({"type": "join", "room": run.room})
    await asyncio.gather(publisher.joined, *(conn.joined for conn in conns))
    elapsed, cpu, timed_out = await publish_run(run, publisher, job)
    expected = run.members * run.publishes
    codes = close_codes([publisher, *conns])
    for stream in streams:
        if stream.close_code is not None:
            codes[str(stream.close_code)] = codes.get(str(stream.close_code), 0) + 1
    await close_all([publisher, *(conns if transport == "websocket" else [])])
    await close_streams(streams)
    return {
        "transport": transport,
        "room": run.room,
        "members": members,
        "publishes": run.publishes,
        "window": run.window,
        "expected": expected,
        "delivered": run.delivered,
        "all_delivered": run.delivered == expected and run.errors == 0,
        "timed_out": timed_out,
        "seconds": elapsed,
        "deliveries_per_s": run.delivered / elapsed if run.delivered else 0.0,
        **cpu,
        "publish_to_last_member": percentiles_ms([ns for ns in run.complete_ns if ns]),
        "errors": run.errors,
        "first_error": run.first_error,
        "close_codes": codes,
    }


async def stream_idle(job: Job, dialer: Dialer) -> Result:
    """``idle`` over HTTP streaming: open streams past their welcome; server RSS per stream."""
    pid = job["server_pid"]
    ignore: Callable[[int], Callable[[bytes], None]] = lambda _: lambda _payload: None  # noqa: E731
    warm = await open_streams(dialer, job["warmup_connections"], ignore)
    await close_streams(warm)
    rss_before = read_rss_kib(pid)
    handshake_ns: list[int] = []
    meter = CpuMeter([pid])
    meter.start()
    started = time.perf_counter()
    streams = await open_streams(dialer, job["connections"], ignore, handshake_ns)
    elapsed = time.perf_counter() - started
    cpu = meter.stop(len(streams))
    rss_after = read_rss_kib(pid)
    still_open = sum(1 for s in streams if s.transport is not None and not s.gone.done())
    await close_streams(streams)
    count = len(streams)
    return {
        "connections": count,
        "still_open": still_open,
        "seconds": elapsed,
        "connects_per_s": count / elapsed,
        "handshake": percentiles_ms(handshake_ns),
        **cpu,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "kib_per_connection": (rss_after - rss_before) / count,
    }


SCENARIOS = {
    "echo": echo, "idle": idle, "fanout": fanout, "recover": recover, "loop": loop_latency,
    "drain": drain,
    "hold": hold, **compression.SCENARIOS,
    "stream_fanout": stream_fanout, "stream_idle": stream_idle,
}  # fmt: skip


async def run(job: Job) -> Result:
    dialer = Dialer(
        job["url"], job.get("jwt_user"), job.get("source_addresses", []),
        extra_headers=job.get("extra_headers", {}), cafile=job.get("cafile"),
    )
    return await SCENARIOS[job["scenario"]](job, dialer)


def main() -> None:
    # The job is the first line: the ``hold`` scenario reads commands after it.
    job: Job = json.loads(sys.stdin.readline())
    if job.get("cpus"):
        os.sched_setaffinity(0, set(job["cpus"]))
    raise_fd_limit()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(job))
    else:
        result = uvloop.run(run(job))
    result["generator_cpus"] = sorted(os.sched_getaffinity(0))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
