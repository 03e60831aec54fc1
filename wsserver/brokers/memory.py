"""MemoryBroker: the broker of one process, the embedded default.

Everything lives in this process: a bounded ring of publications per room
with history, presence counts, user counts. Delivery to the sink is
synchronous, inside :meth:`publish`, which keeps every room in offset order.
A room's history and its offset counter expire ``ttl`` seconds after its last
message (reads do not extend it); a room recreated after that gets a new
epoch, so a client holding an old position is told that its history is gone.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from wsserver.brokers.base import (
    IDEMPOTENCY_TTL,
    Broker,
    BrokerSink,
    HistoryPage,
    HistorySpec,
    NodeInfo,
    Presence,
    Publication,
    PublishResult,
    RoomCount,
    with_position,
)

Clock = Callable[[], float]

#: Tickets kept at once; past it the oldest is dropped (bounded memory under a
#: flood: every ticket needs a valid token and a handshake-rate token anyway).
MAX_TICKETS = 10_000


def new_epoch() -> str:
    """A fresh epoch: 8 URL-safe characters."""
    return secrets.token_urlsafe(6)


@dataclass
class _Stream:
    epoch: str
    top: int = 0
    expires_at: float = 0.0
    kept: deque[Publication] = field(default_factory=deque)


class MemoryBroker(Broker):
    """The one-process broker. ``clock`` is injectable for TTL tests."""

    kind = "memory"

    def __init__(self, node_name: str = "local", clock: Clock = time.monotonic) -> None:
        super().__init__(node_name)
        self._clock = clock
        self._sink: BrokerSink | None = None
        self._subscribed: set[str] = set()
        self._streams: dict[str, _Stream] = {}
        #: (room, key) -> (deadline, result), oldest first: every key lives
        #: IDEMPOTENCY_TTL, so insertion order is deadline order.
        self._idempotent: OrderedDict[tuple[str, str], tuple[float, PublishResult]] = (
            OrderedDict())
        self._presence: dict[str, Counter[str]] = {}
        self._users: Counter[str] = Counter()
        #: ticket -> (expiry, token), oldest first.
        self._tickets: dict[str, tuple[float, str]] = {}
        self._started = time.time()

    @property
    def up(self) -> bool:
        return True

    async def start(self, sink: BrokerSink) -> None:
        self._sink = sink
        self._started = time.time()

    async def close(self) -> None:
        self._sink = None

    # --- publications ---------------------------------------------------------

    async def publish(
        self,
        room: str,
        message: bytes,
        *,
        history: HistorySpec | None = None,
        origin: str | None = None,
        idempotency_key: str | None = None,
    ) -> PublishResult:
        now = self._clock()
        if idempotency_key is not None:
            self._forget_idempotency(now)
            seen = self._idempotent.get((room, idempotency_key))
            if seen is not None:
                return replace(seen[1], duplicate=True)
        if history is not None and history.size > 0:
            stream = self._stream(room, now, history.ttl, write=True)
            stream.top += 1
            publication = Publication(
                room, with_position(message, stream.top, stream.epoch), stream.top,
                stream.epoch, origin,
            )
            stream.kept.append(publication)
            while len(stream.kept) > history.size:
                stream.kept.popleft()
            result = PublishResult(stream.top, stream.epoch)
        else:
            publication = Publication(room, message, origin=origin)
            result = PublishResult()
        if idempotency_key is not None:
            self._idempotent[(room, idempotency_key)] = (now + IDEMPOTENCY_TTL, result)
            self._idempotent.move_to_end((room, idempotency_key))
        if self._sink is not None and room in self._subscribed:
            self._sink.on_publication(publication)
        return result

    def _stream(self, room: str, now: float, ttl: float, *, write: bool) -> _Stream:
        """The room's live stream, made anew (new epoch) when it has expired.

        Only a message extends its life: the history is kept ``ttl`` seconds
        after the room's last message, however often it is read (joins,
        recoveries and reads must not keep a room's history forever).
        """
        stream = self._streams.get(room)
        if stream is None or stream.expires_at <= now:
            stream = self._streams[room] = _Stream(new_epoch(), expires_at=now + ttl)
        if write:
            stream.expires_at = now + ttl
        return stream

    def _forget_idempotency(self, now: float) -> None:
        """Drop the expired keys, oldest first: O(1) per key however many a
        client's publishes left (a scan per publish would be quadratic)."""
        idempotent = self._idempotent
        while idempotent:
            until, _ = next(iter(idempotent.values()))
            if until > now:
                return
            idempotent.popitem(last=False)

    def sweep(self) -> None:
        """Drop expired room streams and idempotency keys (bounded memory)."""
        now = self._clock()
        for room in [r for r, s in self._streams.items() if s.expires_at <= now]:
            del self._streams[room]
        self._forget_idempotency(now)
        for ticket in [t for t, (until, _) in self._tickets.items() if until <= now]:
            del self._tickets[ticket]

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._subscribed.discard(room)

    async def history(
        self, room: str, history: HistorySpec, *, since: int | None = None,
        limit: int | None = None,
    ) -> HistoryPage:
        stream = self._stream(room, self._clock(), history.ttl, write=False)
        if since is None:
            return HistoryPage(stream.epoch, stream.top)
        kept = [p for p in stream.kept if p.offset is not None and p.offset > since]
        oldest = stream.kept[0].offset if stream.kept else stream.top + 1
        complete = since >= stream.top or (oldest is not None and oldest <= since + 1)
        if limit is not None and len(kept) > limit:
            kept = kept[:limit]
            complete = False
        return HistoryPage(stream.epoch, stream.top, kept, complete and since <= stream.top)

    async def reset_epoch(self, room: str, history: HistorySpec, stale: str) -> str:
        stream = self._streams.get(room)
        if stream is not None and stream.epoch != stale:
            return stream.epoch
        stream = self._streams[room] = _Stream(new_epoch(), expires_at=self._clock() + history.ttl)
        return stream.epoch

    # --- presence -------------------------------------------------------------

    async def presence_add(self, room: str, user: str) -> bool:
        counts = self._presence.setdefault(room, Counter())
        counts[user] += 1
        return counts[user] == 1

    async def presence_remove(self, room: str, user: str) -> bool:
        counts = self._presence.get(room)
        if counts is None or counts[user] <= 0:
            return False
        counts[user] -= 1
        if counts[user]:
            return False
        del counts[user]
        if not counts:
            del self._presence[room]
        return True

    async def presence(self, room: str) -> Presence:
        counts = self._presence.get(room, Counter())
        return Presence(sorted(counts), sum(counts.values()))

    async def rooms(self) -> dict[str, RoomCount]:
        return {
            room: RoomCount(sum(counts.values()), len(counts))
            for room, counts in self._presence.items()
        }

    # --- users and nodes ------------------------------------------------------

    async def user_connect(self, user: str, limit: int) -> int | None:
        if self._users[user] >= limit:
            return None
        self._users[user] += 1
        return self._users[user]

    async def user_disconnect(self, user: str) -> None:
        if self._users[user] > 1:
            self._users[user] -= 1
        else:
            self._users.pop(user, None)

    async def user_connections(self, users: Sequence[str]) -> dict[str, int]:
        return {user: self._users.get(user, 0) for user in users}

    async def disconnect_user(self, user: str, code: int, reason: str) -> None:
        if self._sink is not None:
            self._sink.on_disconnect(user, code, reason)

    async def nodes(self) -> list[NodeInfo]:
        if self._sink is None:
            return []
        stats = self._sink.node_stats()
        return [NodeInfo(self.node_name, stats.connections, stats.users, stats.uptime)]

    # --- HTTP streaming -------------------------------------------------------

    async def ticket_put(self, ticket: str, token: str, ttl: float) -> None:
        now = self._clock()
        tickets = self._tickets
        # Oldest first: drop the expired ones at the front, then make room.
        while tickets:
            oldest = next(iter(tickets))
            if tickets[oldest][0] > now and len(tickets) < MAX_TICKETS:
                break
            del tickets[oldest]
        tickets[ticket] = (now + ttl, token)

    async def ticket_take(self, ticket: str) -> str | None:
        entry = self._tickets.pop(ticket, None)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    async def forward(self, node_tag: str, session: str, text: str) -> bool:
        # One process, one node: only this node's own tag reaches anyone.
        if node_tag != self.node_tag or self._forwarded is None:
            return False
        self._forwarded(session, text)
        return True
