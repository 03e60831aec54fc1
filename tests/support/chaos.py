"""The chaos harness: real node processes, careful clients, an API publisher, and the verdict.

:class:`Nodes` runs ``python -m wsserver`` processes on fixed ports (a node
killed with SIGKILL comes back on its port, under its name). :class:`Chaos`
puts 30+ :class:`~tests.support.careful.CarefulClient` s on them, spread over
every node and a few rooms with history, starts a steady
:class:`~tests.support.publisher.Publisher` on ``POST /api/publish``
(idempotency keys, retries on 503 and timeouts, every acknowledged
``(epoch, offset)`` recorded with the unique id in its data) and a
:class:`~tests.support.publisher.ReadyWatch` on every node's ``/readyz``.
A scenario then does its fault and calls :meth:`Chaos.finish`: the publisher
stops, one final message per room is published once every node is ready,
the clients are given a bounded time to reach it, and every promise of
"nothing lost silently" is checked for every client
(:func:`tests.support.ledger.judge`), for the history read back through
``GET /api/history`` (nothing stored twice, each acknowledgement true), and
for the closes (never 4009 or 4029).

Everything runs in the test's one event loop; blocking steps (starting a
process, waiting for its log line) run in a thread so the clients keep
reading meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.careful import CarefulClient, Progress
from tests.support.ledger import Ack, Epochs, Violation, judge, overreaching_gaps, spans
from tests.support.publisher import API_KEY, Http, Publisher, ReadyWatch
from tests.support.servers import NO_HANDSHAKE_LIMIT, RunningServer, ServerFactory, free_port
from tests.support.tokens import SECRET, mint
from tests.support.waiting import until

HISTORY_SIZE = 1000
#: Rooms named ``chaos:...`` keep history; anyone joins, members publish.
ROOMS_TOML = f"""
[rooms]
join = "anyone"
publish = "members"

[rooms.namespaces.chaos]
join = "anyone"
publish = "members"
history_size = {HISTORY_SIZE}
history_ttl = 600
"""
#: The bound of every wait for what a scenario expects to happen soon (clients
#: joined, messages acknowledged, a node's log line, a node's readiness):
#: generous, because a loaded machine (load 10+ on two cores) takes seconds
#: where a quiet one takes milliseconds, and each wait ends on its event, so
#: the bound costs a passing run nothing.
PATIENCE = 60.0
#: How long the clients get to reach the final message once the cluster is
#: healthy, and how long it may stay quiet meanwhile (no client receiving
#: anything: stuck, not slow).
CATCH_UP = PATIENCE
QUIET = 15.0
#: The share of client publishes that may be answered ``unavailable`` with Redis
#: up (a batch past the broker's command timeout on a loaded machine) before
#: the publishers count as cut off.
REFUSED_SHARE = 0.1


# --- the nodes ------------------------------------------------------------------------


class Nodes:
    """The node processes of one scenario; a restarted node keeps its port and name.

    Args:
        factory: the ``run_server`` fixture (it stops every process at the end).
        directory: where the config and API key files go.
        broker: ``memory`` or a Redis URL.
        extra: more flags for every node.
    """

    def __init__(self, factory: ServerFactory, directory: Path, broker: str,
                 extra: Sequence[str] = ()) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "chaos.toml"
        self.config.write_text(ROOMS_TOML)
        self.key_file = directory / "api-key"
        self.key_file.write_text(API_KEY + "\n")
        self.factory = factory
        self.broker = broker
        self.extra = list(extra)
        self.running: list[RunningServer] = []
        self.ports: list[int] = []

    @property
    def redis(self) -> bool:
        return self.broker != "memory"

    def args(self, index: int) -> list[str]:
        args = [
            "--port", str(self.ports[index]), "--node-name", f"n{index}",
            "--jwt-secret", SECRET, "--broker", self.broker, "--config", str(self.config),
            "--api-key-file", str(self.key_file), "--no-access-log", *NO_HANDSHAKE_LIMIT,
        ]
        if self.redis:
            args += ["--broker-probe-interval", "0.5", "--broker-heartbeat", "0.5",
                     "--broker-node-ttl", "2"]
        return args + self.extra

    def _start(self, index: int) -> RunningServer:
        node = self.factory(*self.args(index))
        if self.redis:
            node.wait_for_log(r"broker: Redis at \S+ is up", PATIENCE)
        return node

    async def start(self, count: int) -> None:
        """Start ``count`` nodes at once (each waits for its broker)."""
        self.ports = [free_port() for _ in range(count)]
        self.running = list(await asyncio.gather(
            *(asyncio.to_thread(self._start, i) for i in range(count))
        ))

    async def kill(self, index: int) -> None:
        """SIGKILL: no close frame, no clean-up in Redis."""
        node = self.running[index]
        node.proc.kill()
        await asyncio.to_thread(node.ensure_stopped)

    async def restart(self, index: int) -> None:
        """Start the node again on its port, under its name."""
        self.running[index] = await asyncio.to_thread(self._start, index)

    async def logged(self, text: str, count: int = 1, timeout: float = PATIENCE) -> None:
        """Until the log of every running node holds ``text`` ``count`` times."""
        await until(lambda: all(node.logs().count(text) >= count for node in self.running),
                    timeout)

    @property
    def ws_urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/ws" for port in self.ports]

    @property
    def http_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def warnings(self, limit: int = 12) -> list[str]:
        """The first WARNING/ERROR lines of every node (for a failure's report)."""
        lines = []
        for index, node in enumerate(self.running):
            for line in node.logs().splitlines():
                if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                    lines.append(f"n{index}: {line.strip()[:200]}")
        return lines[:limit]


# --- the scenario --------------------------------------------------------------------


@dataclass
class Verdict:
    """Every violation of one scenario, and what happened in it."""

    violations: list[Violation]
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: When the scenario started (``time.monotonic()``), and what the test did when.
    start: float = 0.0
    timeline: list[tuple[float, str]] = field(default_factory=list)

    def report(self, lines: int = 40) -> str:
        kinds = Counter(v.kind for v in self.violations)
        out = [f"{len(self.violations)} violation(s): "
               + ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common())]
        # A few of each kind first, so one noisy kind does not hide the others.
        shown: list[Violation] = []
        for kind in kinds:
            shown += [v for v in self.violations if v.kind == kind][:max(3, lines // len(kinds))]
        out += [f"  {v.timed(self.start)}" for v in shown[:lines]]
        if len(self.violations) > len(shown[:lines]):
            out.append(f"  ... and {len(self.violations) - len(shown[:lines])} more")
        out.append("stats: " + ", ".join(f"{k}={v}" for k, v in self.stats.items()))
        if self.timeline:
            out.append("timeline: " + "; ".join(f"t={at - self.start:+.2f} s {what}"
                                                for at, what in self.timeline))
        if self.warnings:
            out.append("node warnings:")
            out += [f"  {line}" for line in self.warnings]
        return "\n".join(out)

    def assert_clean(self) -> None:
        assert not self.violations, self.report()


class Chaos:
    """Careful clients, a publisher and a readiness watch over :class:`Nodes`.

    Args:
        nodes: started nodes.
        tag: the scenario's name (ids, users).
        clients: how many long-lived careful clients (spread over every node).
        rooms: how many rooms (each client is in one or two of them).
        interval: seconds between two publishes into one room.
        size: bytes of padding in each message's data.
    """

    def __init__(self, nodes: Nodes, tag: str, *, clients: int = 32, rooms: int = 3,
                 interval: float = 0.04, size: int = 100, seed: int = 1) -> None:
        self.nodes = nodes
        self.tag = tag
        self.rng = random.Random(seed)
        self.epochs = Epochs()
        self.progress = Progress()
        self.rooms = [f"chaos:{tag}-{i}" for i in range(rooms)]
        self.http = Http()
        self.publisher = Publisher(self.http, nodes.http_urls, self.rooms, self.epochs, tag, size,
                                   self.progress.moved)
        self.watch = ReadyWatch(self.http, nodes.http_urls)
        #: Per room: (seconds between publishes, bytes of padding).
        self.traffic: dict[str, tuple[float, int]] = {room: (interval, size) for room in self.rooms}
        #: Per room: publishing loops at once (one unless said otherwise).
        self.streams: dict[str, int] = {}
        self.clients = [
            CarefulClient(
                f"c{i:02d}", mint(f"{tag}-c{i:02d}"), nodes.ws_urls,
                self._rooms_of(i), self.epochs, self.progress, home=i % len(nodes.ports),
            )
            for i in range(clients)
        ]
        self._first_busy = len(self.clients)  # busy_room() adds its readers after
        #: Short-lived clients (join churn): only what they saw while connected is judged.
        self.passers: list[CarefulClient] = []
        self.start_time = time.monotonic()
        self.timeline: list[tuple[float, str]] = []
        #: Per room: set to stop publishing there (all of them at :meth:`finish`).
        self._stop_publishing: dict[str, asyncio.Event] = {}
        self._stop_churn = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._serial = itertools.count()

    def _rooms_of(self, index: int) -> list[str]:
        first = self.rooms[index % len(self.rooms)]
        if index % 2:
            return [first, self.rooms[(index + 1) % len(self.rooms)]]
        return [first]

    async def __aenter__(self) -> Chaos:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop everything still running (also after a failure): no socket is left open."""
        self._stop_churn.set()
        for stop in self._stop_publishing.values():
            stop.set()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        # Every client stopped (no socket left open) before any error is raised.
        stopped = await asyncio.gather(*(c.stop() for c in self.clients + self.passers),
                                       return_exceptions=True)
        await self.watch.stop()
        await self.http.aclose()
        for outcome in stopped:
            if isinstance(outcome, BaseException):
                raise outcome

    def mark(self, what: str) -> None:
        """Note in the timeline of the report what the test does now."""
        self.timeline.append((time.monotonic(), what))

    async def start(self) -> None:
        """Every client joined, then the watch and the publisher run."""
        self.start_time = time.monotonic()
        for client in self.clients:
            client.start()
        ok = await self.progress.until(lambda: all(c.joined() for c in self.clients), PATIENCE)
        assert ok, "not every client joined: " + "; ".join(
            f"{c.name}: {c.where()} closes={c.closes}" for c in self.clients if not c.joined()
        )
        self.watch.start()
        self.mark("every client joined; publishing")
        for room, (interval, size) in self.traffic.items():
            stop = self._stop_publishing.setdefault(room, asyncio.Event())
            for _ in range(self.streams.get(room, 1)):
                self._spawn(self.publisher.steady(room, interval, stop, size))

    def busy_room(self, *, size: int, interval: float, readers: int, slow: int,
                  ) -> tuple[str, list[CarefulClient]]:
        """Before :meth:`start`: one more room, with ``size``-byte messages every
        ``interval`` seconds from each of two publishing loops, ``readers``
        clients that keep up and ``slow`` ones (also in the first room) whose
        socket buffer is 4 kB and whose library queues a single message, for
        :meth:`CarefulClient.stall`. The room and the slow ones."""
        room = f"chaos:{self.tag}-busy"
        self.rooms.append(room)
        self.traffic[room] = (interval, size)
        self.streams[room] = 2
        self.publisher.expect(room)
        added = []
        for index in range(readers + slow):
            name = f"{'s' if index < slow else 'b'}{index:02d}"
            rooms = [room, self.rooms[0]] if index < slow else [room]
            options: dict[str, Any] = {"rcvbuf": 4096, "max_queue": 1} if index < slow else {}
            client = CarefulClient(name, mint(f"{self.tag}-{name}"), self.nodes.ws_urls, rooms,
                                   self.epochs, self.progress, home=index, **options)
            self.clients.append(client)
            added.append(client)
        return room, added[:slow]

    def calm(self, room: str) -> None:
        """Stop publishing into ``room`` (the others go on)."""
        self._stop_publishing[room].set()
        self.mark(f"no more publishing into {room}")

    def _spawn(self, coro: Awaitable[None]) -> None:
        self._background.append(asyncio.ensure_future(coro))

    async def published(self, count: int, room: str | None = None,
                        timeout: float = 2 * PATIENCE) -> None:
        """Until ``count`` more messages were acknowledged (in ``room``, or in all):
        time passing, as the publisher sees it. (At load 12 the publisher runs at
        a third of its pace or less: 881 of 900 acknowledgements in 30 s, where the
        whole scenario takes 11 s at load 2.)"""

        def done() -> int:
            return self.publisher.count if room is None else len(self.publisher.acked[room])

        target = done() + count
        assert await self.progress.until(lambda: done() >= target, timeout), (
            f"only {done()} of {target} messages acknowledged in {timeout} s"
        )

    # --- churn ---------------------------------------------------------------------

    def churn(self, hoppers: int = 4, passers: int = 2) -> None:
        """Join churn until :meth:`finish`: ``hoppers`` long-lived clients leave one of
        their rooms and re-join it (with ``since``, or without every third time),
        ``passers`` loops connect a new client, join, read a moment and close."""
        for client in self.clients[self._first_busy - hoppers:self._first_busy]:
            self._spawn(self._hop(client))
        for index in range(passers):
            self._spawn(self._pass(index))

    async def _hop(self, client: CarefulClient) -> None:
        room = sorted(client.wanted)[0]
        turn = 0
        while not self._stop_churn.is_set():
            # A leave and a join, about three times a second: within the
            # default message rate (10/s) with room for reconnects.
            await self._nap(0.2, 0.4)
            await client.leave(room)
            # The join's history read and a publish reach Redis together: the
            # moment when a join must not cost the room's members anything.
            await self._first(self.publisher.next_send(room), self._stop_churn.wait(), 1.0)
            await asyncio.sleep(self.rng.uniform(0, 0.004))
            turn += 1
            await client.rejoin(room, with_since=turn % 3 != 0)
        await client.rejoin(room)

    async def _pass(self, index: int) -> None:
        while not self._stop_churn.is_set():
            n = next(self._serial)
            room = self.rooms[n % len(self.rooms)]
            passer = CarefulClient(
                f"p{n:03d}", mint(f"{self.tag}-p{index}"), self.nodes.ws_urls,
                [room], self.epochs, self.progress, home=n, lazy=True,
            )
            self.passers.append(passer)
            passer.start()
            if await self._unless_done(passer.connected):
                await self._first(self.publisher.next_send(room), self._stop_churn.wait(), 1.0)
                await asyncio.sleep(self.rng.uniform(0, 0.004))
                await passer.rejoin(room, with_since=False)
                await self._unless_done(passer.joined)
            await self._nap(0.05, 0.2)
            await passer.stop()

    async def _unless_done(self, condition: Callable[[], bool]) -> bool:
        """Until ``condition()`` holds (True), or the churn is over (False)."""
        await self.progress.until(lambda: condition() or self._stop_churn.is_set(), PATIENCE)
        return condition()

    @staticmethod
    async def _first(*coros_and_timeout: Any) -> None:
        """Until the first of the coroutines is done (the last argument: a timeout)."""
        *coros, timeout = coros_and_timeout
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _nap(self, low: float, high: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_churn.wait(), self.rng.uniform(low, high))

    # --- the end ---------------------------------------------------------------------

    async def finish(self, *, expect_unready: Sequence[int] = (),
                     expect_down: Sequence[int] = (),
                     check_gaps: bool = True) -> Verdict:
        """Stop the publisher and the churn, publish one final message per room once
        every node is ready, give the clients :data:`CATCH_UP` seconds to reach it,
        then judge.

        Args:
            expect_unready: nodes whose ``/readyz`` must have answered 503 and then 200.
            expect_down: nodes that must have stopped answering, then answered 200.
            check_gaps: also flag gaps that covered messages still in the history.
        """
        self._stop_churn.set()
        for stop in self._stop_publishing.values():
            stop.set()
        await asyncio.gather(*self._background)
        self.mark("publisher stopped")
        violations: list[Violation] = []
        if not await self.watch.all_ready(PATIENCE):
            violations.append(Violation("readyz", "-", "-", f"not every node ready: "
                                        f"{self.watch.seen}"))
        finals = {}
        for room in self.rooms:
            ack = await self.publisher.publish(room)
            if ack is not None:
                finals[room] = ack
        final_positions = {room: (ack.epoch, ack.offset) for room, ack in finals.items()}
        self.mark("final messages published")
        await self.progress.until(lambda: all(c.reached(final_positions) for c in self.clients),
                                  CATCH_UP, QUIET)
        await self.watch.stop()
        for client in self.clients:
            if not client.reached(final_positions):
                violations.append(Violation(
                    "not-caught-up", client.name, "-",
                    f"after the final messages {final_positions}: {client.where()}"
                    f"; connections {client.connections}, refusals {client.refusals}",
                ))
        await asyncio.gather(*(c.stop() for c in self.clients))
        history = {room: await self._history(room, violations) for room in self.rooms}
        violations += self._judge(finals, history, check_gaps)
        violations += self._readiness(expect_unready, expect_down)
        violations += [Violation("publish", "publisher", "-", line)
                       for line in self.publisher.unacked + self.publisher.wrong]
        await self.http.aclose()
        return Verdict(violations, self._stats(), self.nodes.warnings(), self.start_time,
                       self.timeline)

    async def _history(self, room: str, violations: list[Violation]) -> list[dict[str, Any]]:
        for url in self.nodes.http_urls:
            status, answer = await self.http.call(
                f"{url}/api/history?room={room}&limit={HISTORY_SIZE}", timeout=PATIENCE / 2
            )
            if status == 200:
                messages: list[dict[str, Any]] = answer["messages"]
                return messages
        violations.append(Violation("history", "-", room, "no node answered GET /api/history"))
        return []

    def _judge(self, finals: dict[str, Ack], history: dict[str, list[dict[str, Any]]],
               check_gaps: bool) -> list[Violation]:
        found: list[Violation] = []
        kept_acks: dict[str, list[Ack]] = {}
        for room, messages in history.items():
            uids = Counter(m["data"]["uid"] for m in messages)
            twice = {uid: n for uid, n in uids.items() if n > 1}
            if twice:
                found.append(Violation("stored-twice", "history", room,
                                       f"uids stored more than once: {twice}", None))
            at = {(m["epoch"], m["offset"]): m["data"]["uid"] for m in messages}
            for ack in self._acks(room):
                held = at.get((ack.epoch, ack.offset))
                if held is not None and held != ack.uid:
                    found.append(Violation("ack-mismatch", "history", room,
                                           f"{ack.epoch}/{ack.offset} holds {held}, "
                                           f"acknowledged as {ack.uid}", None))
            offsets = [m["offset"] for m in messages]
            if offsets and offsets != list(range(offsets[0], offsets[0] + len(offsets))):
                found.append(Violation("history-hole", "history", room,
                                       f"the history holds offsets {spans(offsets)}", None))
            # Trimmed (it starts past offset 1): what is gone cannot be told apart.
            trimmed = not offsets or offsets[0] != 1
            kept_acks[room] = [] if trimmed else [
                Ack(room, m["epoch"], m["offset"], m["data"]["uid"]) for m in messages
            ]
        for client in self.clients:
            found += client.violations
            for room, ledger in client.ledgers.items():
                found += ledger.violations
                if room in finals:
                    found += judge(ledger, self._acks(room), finals[room])
                if check_gaps and kept_acks.get(room):
                    found += overreaching_gaps(ledger, kept_acks[room])
        published = sum(c.published for c in self.clients)
        refused = sum(c.publishes_refused for c in self.clients)
        if refused > published * REFUSED_SHARE:
            found.append(Violation(
                "publish-refused", "clients", "-",
                f"{refused} of {published} client publishes answered 'unavailable' "
                f"(more than {REFUSED_SHARE:.0%}): the publishers were in effect cut off", None,
            ))
        for passer in self.passers:
            found += passer.violations
            for ledger in passer.ledgers.values():
                found += ledger.violations
        return found

    def _acks(self, room: str) -> list[Ack]:
        """Every acknowledged message of ``room``: the API's, and the clients' own
        publishes whose copy came back."""
        return self.publisher.acked[room] + [
            ack for client in self.clients for ack in client.own_acks if ack.room == room
        ]

    def _readiness(self, unready: Sequence[int], down: Sequence[int]) -> list[Violation]:
        found = []
        for index, url in enumerate(self.nodes.http_urls):
            states = self.watch.seen[url]
            wanted = "503" if index in unready else "down" if index in down else None
            # Came back: a 200 after the fault. What follows it (a poll that timed
            # out on a loaded machine reads as "down") is not the fault's.
            if wanted is not None and (wanted not in states
                                       or "200" not in states[states.index(wanted):]):
                found.append(Violation("readyz", f"n{index}", "-",
                                       f"expected {wanted} then 200, saw {states}"))
        return found

    def _stats(self) -> dict[str, Any]:
        everyone = self.clients + self.passers
        closes = Counter(c.code for client in everyone for c in client.closes if not c.by_us)
        return {
            "published": self.publisher.count,
            "client_publishes": sum(c.published for c in self.clients),
            "client_publishes_unavailable": sum(c.publishes_refused for c in self.clients),
            "retries": self.publisher.retries,
            "clients": len(self.clients),
            "passers": len(self.passers),
            "deliveries": sum(len(d) for c in everyone for ledger in c.ledgers.values()
                              for d in ledger.deliveries.values()),
            "reconnects": sum(c.connections - 1 for c in self.clients),
            "leaves_unavailable": sum(c.leaves_unavailable for c in everyone),
            "server_closes": dict(closes),
            "readyz": {f"n{i}": self.watch.seen[url]
                       for i, url in enumerate(self.nodes.http_urls)},
        }
