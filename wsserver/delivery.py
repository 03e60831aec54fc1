"""Delivery: a room's messages to each member on this node, once, in order, or a gap.

The :class:`~wsserver.hub.Hub` decides who may be in a room and hands what the
broker publishes to :class:`Delivery`, which holds each room's members and what
"nothing lost silently" rests on (docs/protocol.md, "What a client can count
on"), in rooms with history:

* **The room's position** is the last offset this node delivered in the room;
  only deliveries move it. A publication beyond the next offset (a pub/sub
  message lost, a re-subscription after a Redis outage, a new epoch) makes
  the node read the missing range from the history once and deliver it in
  order, and tell the members with a ``gap`` what is really gone. A broker
  that went back in time (its top below the position) gets a new epoch.
* **Each member's seat** (:class:`_Seat`) says what that member still needs
  apart from the room's stream: while its join is answered, live
  publications are *held* for it; after the answer, its *floor* (the
  answer's offset) keeps it from getting a live message the answer already
  covered, without moving the room's position for the others (a join's
  history read may see messages this node has not delivered yet).
* **A lagging member** is one whose unsent backlog would pass
  ``--max-write-buffer`` with the next room message. It is not closed:
  delivery stops handing it the room's live messages and, once its backlog
  has drained, sends what it skipped from the history, paced by the same
  bound, and a ``gap`` for what the history no longer has (in rooms without
  history: ``{"type": "gap", "dropped": N}``).
* **A recovery** (a join with ``since``) that does not fit in one answer
  within the write bound is answered with the first messages and
  ``"pending": N``; the N others follow as ordinary messages, paced, before
  any live one.

The message is prepared once per publication (one encoding per kind of
transport) and handed to each member, as Centrifuge's
``hub.broadcastPublication`` does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from wsserver import protocol
from wsserver.brokers.base import (
    Broker,
    BrokerUnavailable,
    HistoryPage,
    HistorySpec,
    Publication,
)
from wsserver.errors import CloseError, Forbidden
from wsserver.metrics import Metrics
from wsserver.protocol import MessageId
from wsserver.rooms import NamespacePolicy, RoomPolicy
from wsserver.transport import Prepared

if TYPE_CHECKING:
    from wsserver.auth import Identity

log = logging.getLogger("wsserver.hub")

#: Seconds a publisher's origin tag waits for its publication to come back.
ORIGIN_TTL = 60.0
#: Publications read per history page when a lagging member catches up.
CATCH_UP_PAGE = 200
#: Seconds between attempts to read a lagging member's backlog while the broker is down.
CATCH_UP_RETRY = 1.0
#: Reads of the history a repair tries before it tells the members what it missed.
REPAIR_ATTEMPTS = 3
#: Seconds between those reads.
REPAIR_RETRY = 0.5


class Member(Protocol):
    """What the hub needs of a room member (a :class:`~wsserver.session.Session`)."""

    identity: Identity | None
    closed: bool

    @property
    def gone(self) -> bool:
        """True once the connection is closing or closed: nothing more reaches it."""
        ...

    def room_budget(self) -> int:
        """Bytes of room traffic the connection can still take under its write bound."""
        ...

    def send_prepared(self, message: Prepared) -> bool:
        """A reply or answer: sent, or the connection is closed as a slow consumer."""
        ...

    def deliver(self, message: Prepared) -> bool:
        """Room traffic: sent, or False (nothing sent) when it would pass the write
        bound or the connection is gone."""
        ...

    def drained(self) -> Awaitable[None]:
        """Resolves once the backlog is back well under the write bound, or the
        connection is gone."""
        ...

    def forbidden(self, message: str) -> Forbidden:
        """The ``forbidden`` error, counted."""
        ...

    def end(self, error: CloseError) -> None:
        """Close the connection with ``error``'s code."""
        ...

def history_spec(policy: NamespacePolicy) -> HistorySpec | None:
    """The broker's history policy for a namespace, None without history."""
    if policy.history_size <= 0:
        return None
    return HistorySpec(policy.history_size, policy.history_ttl)

@dataclass(frozen=True, slots=True)
class _Gap:
    """A ``gap`` held for a member whose join is being answered."""

    epoch: str
    offset: int

class _Lag:
    """What a lagging member skipped: from after ``offset`` of ``epoch`` (rooms
    with history, read back later), or ``dropped`` messages (rooms without)."""

    __slots__ = ("dropped", "epoch", "offset")

    def __init__(self, epoch: str | None, offset: int) -> None:
        self.epoch = epoch
        self.offset = offset
        self.dropped = 0

class _Seat:
    """A member's own state in one room; rooms' seats are None for the usual case
    (a member that just gets every live message), so fan-out stays one check."""

    __slots__ = ("floor", "holding", "lag")

    def __init__(self) -> None:
        #: Live publications and gaps held while the member's join (or catch-up)
        #: is answered, in arrival order.
        self.holding: list[Publication | _Gap] | None = None
        #: (epoch, offset): what the member's answer covered.
        self.floor: tuple[str, int] | None = None
        #: Set while the member lags (see :class:`_Lag`).
        self.lag: _Lag | None = None

    @property
    def idle(self) -> bool:
        return self.holding is None and self.floor is None and self.lag is None

def _gap_message(room: str, epoch: str, offset: int) -> Prepared:
    return Prepared(protocol.encode(
        {"type": "gap", "room": room, "epoch": epoch, "offset": offset, "recovered": False}
    ))

def _dropped_message(room: str, dropped: int) -> Prepared:
    return Prepared(protocol.encode({"type": "gap", "room": room, "dropped": dropped}))

def _with_id(payload: bytes, msg_id: MessageId) -> bytes:
    """A message's JSON with the publisher's ``id`` added (its own copy)."""
    return b"%s,\"id\":%s}" % (payload[:-1], protocol.encode({"_": msg_id})[5:-1])

class Delivery:
    """This node's room members and their seats, and every message's way to them."""

    def __init__(
        self,
        broker: Broker,
        policy: RoomPolicy,
        metrics: Metrics,
        *,
        spawn: Callable[[Any], None],
        max_recovery: int = 300,
        max_recovery_bytes: int = 4 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.policy = policy
        self.metrics = metrics
        self.max_recovery = max_recovery
        self.max_recovery_bytes = max_recovery_bytes
        #: Seconds between history reads that failed (tests set them to 0).
        self.repair_retry = REPAIR_RETRY
        self.catch_up_retry = CATCH_UP_RETRY
        self._spawn = spawn
        self._clock = clock
        #: Per room, its members and their seats (None: nothing special).
        self._members: dict[str, dict[Member, _Seat | None]] = {}
        self._rooms_of: dict[Member, set[str]] = {}
        #: Origin tag → (publisher, its message id, when), for the publisher's own copy.
        self._origins: dict[str, tuple[Member, MessageId, float]] = {}
        self._origin_serial = 0
        #: Per room with history: (epoch, last offset delivered on this node).
        self._positions: dict[str, tuple[str, int]] = {}
        #: Per room being repaired: publications held until the repair is done.
        self._repairing: dict[str, list[Publication]] = {}

    # --- membership ------------------------------------------------------------

    def rooms_of(self, session: Member) -> set[str]:
        return set(self._rooms_of.get(session, ()))

    def is_member(self, session: Member, room: str) -> bool:
        return room in self._rooms_of.get(session, ())

    def members(self, room: str) -> list[Member]:
        return list(self._members.get(room, ()))

    def count(self, room: str) -> int:
        """Connections in ``room`` on this node."""
        return len(self._members.get(room, ()))

    def has_room(self, room: str) -> bool:
        return room in self._members

    def lagging(self, session: Member, room: str) -> bool:
        """True while ``session`` skips ``room``'s live messages (see the module doc)."""
        seat = self._members.get(room, {}).get(session)
        return seat is not None and seat.lag is not None

    def __len__(self) -> int:
        return len(self._members)

    def hold(self, session: Member, room: str) -> _Seat:
        """Make ``session`` a member whose live publications are held until answered."""
        seat = _Seat()
        seat.holding = []
        self._rooms_of.setdefault(session, set()).add(room)
        self._members.setdefault(room, {})[session] = seat
        return seat

    def holds(self, session: Member, room: str, seat: _Seat) -> bool:
        """True while ``seat`` (from :meth:`hold`) is still ``session``'s in ``room``."""
        return self._members.get(room, {}).get(session) is seat

    def remove(self, session: Member, room: str) -> bool:
        """Take ``session`` out of ``room``; False when it was not a member there."""
        rooms = self._rooms_of.get(session)
        if not rooms or room not in rooms:
            return False
        rooms.discard(room)
        if not rooms:
            del self._rooms_of[session]
        members = self._members[room]
        seat = members.pop(session)
        if seat is not None:
            self._clear_lag(seat)
        if not members:
            del self._members[room]
        return True

    def forget_room(self, room: str) -> None:
        """The node no longer follows ``room``: its position and repair go."""
        self._positions.pop(room, None)
        self._repairing.pop(room, None)

    def forget(self, session: Member) -> None:
        """``session`` is gone: its publications' origin tags go too."""
        for tag in [t for t, (s, _, _) in self._origins.items() if s is session]:
            del self._origins[tag]

    def answer_join(
        self, session: Member, room: str, seat: _Seat, page: HistoryPage | None,
        since: dict[str, Any] | None, answer: Callable[[dict[str, Any]], None],
    ) -> None:
        """Send ``session`` its ``joined`` answer (from the history ``page``), then what
        it leaves pending and what was held for the session, and go live."""
        reply, pending = self._joined_answer(session, room, page, since)
        answer(reply)
        if page is None:
            self._release(session, room, seat, None)
        elif pending:
            self._spawn(self._send_pending(session, room, seat, page, pending))
        else:
            self._release(session, room, seat, (page.epoch, page.offset))

    # --- the publisher's own copy ------------------------------------------------

    def remember_origin(self, session: Member, msg_id: MessageId) -> str:
        """A tag for ``session``'s publish, so that its copy carries ``msg_id``."""
        self._origin_serial += 1
        tag = f"{self.broker.node_name}/{self._origin_serial}"
        self._origins[tag] = (session, msg_id, self._clock())
        return tag

    def drop_origin(self, tag: str) -> None:
        """The publish with ``tag`` did not happen."""
        self._origins.pop(tag, None)

    def sweep(self) -> None:
        """Forget origin tags whose publication never came back."""
        cutoff = self._clock() - ORIGIN_TTL
        for tag in [t for t, (_, _, at) in self._origins.items() if at < cutoff]:
            del self._origins[tag]

    def deliver_event(self, room: str, payload: bytes) -> None:
        """A message of the node's own (an event) to every member of ``room``."""
        self._deliver(Publication(room, payload))

    # --- answering a join ----------------------------------------------------------

    def _joined_answer(
        self, session: Member, room: str, page: HistoryPage | None,
        since: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], list[Publication]]:
        """The ``joined`` reply, and the recovered publications it leaves pending."""
        if page is None:
            return {"type": "joined", "room": room}, []
        answer: dict[str, Any] = {"type": "joined", "room": room, "epoch": page.epoch,
                                  "offset": page.offset}
        if since is None:
            return answer, []
        publications = list(page.publications)
        size = sum(len(p.payload) for p in publications)
        recovered = (
            since["epoch"] == page.epoch
            and page.complete
            and len(publications) <= self.max_recovery
            and size <= self.max_recovery_bytes
        )
        answer["recovered"] = recovered
        if not recovered:
            answer["messages"] = []
            self.metrics.recoveries.labels("lost").inc()
            return answer, []
        self.metrics.recoveries.labels("recovered").inc()
        # As many as the connection can take now go in the answer; the rest
        # follow it as ordinary messages, paced by the write bound.
        budget = session.room_budget()
        inline = 0
        used = 0
        for publication in publications:
            used += len(publication.payload) + 1
            if used > budget:
                break
            inline += 1
        answer["messages"] = protocol.RawJSONList([p.payload for p in publications[:inline]])
        pending = publications[inline:]
        if pending:
            answer["pending"] = len(pending)
        return answer, pending

    async def _send_pending(
        self, session: Member, room: str, seat: _Seat, page: HistoryPage,
        pending: list[Publication],
    ) -> None:
        """The recovered messages the ``joined`` answer left out, paced; then go live."""
        for publication in pending:
            message = self._message_for(session, publication)
            if not await self._send_paced(session, room, seat, message):
                return
            self.metrics.deliveries.inc()
        self._release(session, room, seat, (page.epoch, page.offset))

    async def _send_paced(
        self, session: Member, room: str, seat: _Seat, message: Prepared
    ) -> bool:
        """Deliver one message read back from the history, waiting for room under
        the write bound; False when the member has gone (or left) meanwhile."""
        while not session.deliver(message):
            if not self._seated(session, room, seat):
                return False
            await session.drained()
        return True

    def _seated(self, session: Member, room: str, seat: _Seat) -> bool:
        """True while ``seat`` is still ``session``'s in ``room`` (not left, not gone;
        a leave and a new join make a new seat)."""
        return not session.gone and self._members.get(room, {}).get(session) is seat

    def _message_for(self, session: Member, publication: Publication) -> Prepared:
        """``publication`` for ``session``: with its message id when it published it."""
        if publication.origin is not None:
            own = self._origins.get(publication.origin)
            if own is not None and own[0] is session:
                del self._origins[publication.origin]
                return Prepared(_with_id(publication.payload, own[1]))
        return Prepared(publication.payload)

    def _release(
        self, session: Member, room: str, seat: _Seat, position: tuple[str, int] | None
    ) -> None:
        """Stop holding for ``session``: send what was held above ``position``, then
        keep ``position`` as its floor until the room's live messages pass it.

        A held publication of another epoch without a held gap before it means
        the history changed under the answer: the member catches up from its
        position, which reads what is kept and tells it with a gap what is not.
        """
        held, seat.holding = seat.holding or [], None
        for index, item in enumerate(held):
            if isinstance(item, _Gap):
                if position is not None and item.epoch == position[0] and (
                    item.offset <= position[1]
                ):
                    continue  # the answer is already past this gap
                if not session.deliver(_gap_message(room, item.epoch, item.offset)):
                    self._lag_from(session, room, seat, position, held[index:])
                    return
                position = (item.epoch, item.offset)
                continue
            if position is not None and item.epoch is not None and item.offset is not None:
                if item.epoch == position[0] and item.offset <= position[1]:
                    continue
                if item.epoch != position[0] or item.offset > position[1] + 1:
                    self._lag_from(session, room, seat, position, held[index:])
                    return
            if not session.deliver(self._message_for(session, item)):
                self._lag_from(session, room, seat, position, held[index:])
                return
            self.metrics.deliveries.inc()
            if item.epoch is not None and item.offset is not None:
                position = (item.epoch, item.offset)
        seat.floor = position
        self._tidy(session, room, seat)

    def _lag_from(
        self, session: Member, room: str, seat: _Seat, position: tuple[str, int] | None,
        rest: Sequence[Publication | _Gap],
    ) -> None:
        """``session`` takes nothing more of ``room`` for now: catch it up later from
        ``position`` (rooms with history); ``rest`` is what it did not get."""
        if session.gone:
            return
        lag = _Lag(None, 0) if position is None else _Lag(*position)
        # Messages without an offset (no history, or join/leave events) are not
        # read back: they are counted and reported as dropped.
        lag.dropped = sum(1 for item in rest if isinstance(item, Publication)
                          and item.offset is None)
        self._set_lag(session, room, seat, lag)

    def _set_lag(self, session: Member, room: str, seat: _Seat, lag: _Lag) -> None:
        """``session`` skips ``room``'s live messages from now; caught up once drained."""
        seat.floor = None
        if seat.lag is None:
            self.metrics.lagging.inc()
        seat.lag = lag
        self._spawn(self._catch_up(session, room, seat))

    def _clear_lag(self, seat: _Seat) -> _Lag | None:
        lag, seat.lag = seat.lag, None
        if lag is not None:
            self.metrics.lagging.dec()
        return lag

    def _tidy(self, session: Member, room: str, seat: _Seat) -> None:
        """Forget a seat that has nothing left to say (fan-out's fast path)."""
        members = self._members.get(room)
        if seat.idle and members is not None and members.get(session) is seat:
            members[session] = None

    def _seat(self, session: Member, room: str) -> _Seat | None:
        """``session``'s seat in ``room`` (made when it has none); None if not a member."""
        members = self._members.get(room)
        if members is None or session not in members:
            return None
        seat = members[session]
        if seat is None:
            seat = members[session] = _Seat()
        return seat

    # --- lagging members -------------------------------------------------------

    def _start_lag(self, session: Member, room: str, publication: Publication) -> None:
        """``publication`` did not fit under ``session``'s write bound."""
        seat = self._seat(session, room)
        if seat is None or session.gone:
            return
        if publication.offset is not None and publication.epoch is not None:
            lag = _Lag(publication.epoch, publication.offset - 1)
        else:
            position = self._positions.get(room) if history_spec(
                self.policy.policy_for(room)) is not None else None
            lag = _Lag(*position) if position is not None else _Lag(None, 0)
            lag.dropped = 1
        log.debug("room %r: a member lags (over its write bound); its live messages wait",
                  room)
        self._set_lag(session, room, seat, lag)

    async def _catch_up(self, session: Member, room: str, seat: _Seat) -> None:
        """Once ``session``'s backlog has drained: what it skipped, then live again.

        Live publications are held meanwhile; the history is read from the
        member's position in pages, each message delivered under the write
        bound; what the history no longer keeps is told with a ``gap``.
        """
        await session.drained()
        if not self._seated(session, room, seat):
            return
        lag = self._clear_lag(seat)
        if lag is None:
            return
        spec = history_spec(self.policy.policy_for(room))
        if lag.epoch is None or spec is None:
            # No history to read back: say how many were dropped, and go on.
            self._tidy(session, room, seat)
            session.send_prepared(_dropped_message(room, lag.dropped))
            return
        seat.holding = []
        epoch, after = lag.epoch, lag.offset
        while True:
            try:
                page = await self.broker.history(room, spec, since=after, limit=CATCH_UP_PAGE)
                if page.epoch != epoch:
                    # The history was lost and restarted: read the new epoch.
                    page = await self.broker.history(room, spec, since=0, limit=CATCH_UP_PAGE)
            except BrokerUnavailable:
                await asyncio.sleep(self.catch_up_retry)
                if not self._seated(session, room, seat):
                    return
                continue
            lost = page.epoch != epoch
            if lost:
                epoch, after = page.epoch, 0
            kept = [p for p in page.publications if p.offset is not None and p.offset > after]
            first = kept[0].offset if kept and kept[0].offset is not None else page.offset + 1
            if first > after + 1:
                lost = True
                after = first - 1
            if not self._seated(session, room, seat):
                return
            if lost and not await self._send_paced(
                session, room, seat, _gap_message(room, epoch, after)
            ):
                return
            for publication in kept:
                if not await self._send_paced(
                    session, room, seat, self._message_for(session, publication)
                ):
                    return
                self.metrics.deliveries.inc()
                assert publication.offset is not None
                after = publication.offset
            if after >= page.offset or not kept:
                break
        if lag.dropped:
            session.send_prepared(_dropped_message(room, lag.dropped))
        self._release(session, room, seat, (epoch, after))

    # --- the room's stream ---------------------------------------------------------

    def on_publication(self, publication: Publication) -> None:
        """A publication in a room with members here: deliver it once to each."""
        room = publication.room
        if room not in self._members:
            self._origins.pop(publication.origin or "", None)
            return
        if publication.offset is not None and publication.epoch is not None:
            held = self._repairing.get(room)
            if held is not None:
                held.append(publication)
                return
            position = self._positions.get(room) or self._lowest_floor(room, publication.epoch)
            if position is not None:
                if position[0] != publication.epoch:
                    log.warning("room %r: epoch changed %s → %s; reading what the new one "
                                "kept", room, position[0], publication.epoch)
                    self._start_repair(room, position, publication)
                    return
                if publication.offset <= position[1]:
                    return  # already delivered (a repair read it first)
                if publication.offset > position[1] + 1:
                    self._start_repair(room, position, publication)
                    return
            self._positions[room] = (publication.epoch, publication.offset)
        self._deliver(publication)

    def _lowest_floor(self, room: str, epoch: str) -> tuple[str, int] | None:
        """Before this node delivered anything in ``room``: the lowest position its
        members' answers gave (in ``epoch`` when any was), from which to check the
        first publication for a hole."""
        floors = [seat.floor for seat in self._members.get(room, {}).values()
                  if seat is not None and seat.floor is not None]
        if not floors:
            return None
        same = [floor for floor in floors if floor[0] == epoch]
        return min(same or floors, key=lambda floor: floor[1])

    def _deliver(self, publication: Publication) -> None:
        room = publication.room
        members = self._members.get(room)
        tag = publication.origin
        own = self._origins.get(tag) if tag is not None else None
        keep_tag = False
        delivered = 0
        if members:
            message = Prepared(publication.payload)
            publisher = own[0] if own is not None else None
            for member, seat in list(members.items()):
                if member is publisher:
                    assert own is not None
                    sent, keep_tag = self._deliver_own(member, room, seat, publication, own[1])
                    delivered += sent
                    continue
                if seat is not None and not self._admits(member, room, seat, publication):
                    continue
                if member.deliver(message):
                    delivered += 1
                elif not member.gone:
                    self._start_lag(member, room, publication)
        if own is not None and not keep_tag:
            self._origins.pop(tag or "", None)
        self.metrics.deliveries.inc(delivered)

    def _deliver_own(
        self, member: Member, room: str, seat: _Seat | None, publication: Publication,
        msg_id: MessageId,
    ) -> tuple[bool, bool]:
        """The publisher's own copy, which carries its message ``id`` (its reply).

        Returns (sent, keep the origin tag): a copy that waits (held for a
        join, or read back by a catch-up) finds its id by the tag later. In a
        room without history nothing reads it back, so a publisher past its
        write bound still gets its copy, as a reply.
        """
        copy = Prepared(_with_id(publication.payload, msg_id))
        history = publication.offset is not None
        if seat is not None:
            if seat.holding is not None:
                seat.holding.append(publication)
                return False, True
            if seat.lag is not None:
                if history:
                    return False, True
                return member.send_prepared(copy), False
            if not self._admits(member, room, seat, publication):
                return False, False
        if member.deliver(copy):
            return True, False
        if member.gone:
            return False, False
        if history:
            self._start_lag(member, room, publication)
            return False, True
        return member.send_prepared(copy), False

    def _admits(self, member: Member, room: str, seat: _Seat, publication: Publication) -> bool:
        """Whether a live ``publication`` goes to ``member`` now (see :class:`_Seat`)."""
        if seat.holding is not None:
            seat.holding.append(publication)
            return False
        lag = seat.lag
        if lag is not None:
            if publication.offset is None:
                lag.dropped += 1
            elif lag.epoch is None and publication.epoch is not None:
                # It lagged on a message without an offset: the catch-up reads the
                # history from the first one with an offset it skipped.
                lag.epoch, lag.offset = publication.epoch, publication.offset - 1
            return False  # with an offset, the catch-up reads it back
        floor = seat.floor
        if floor is not None and publication.offset is not None:
            if publication.epoch == floor[0] and publication.offset <= floor[1]:
                return False  # its answer covered this one
            seat.floor = None
            self._tidy(member, room, seat)
        return True

    def _start_repair(
        self, room: str, position: tuple[str, int], trigger: Publication | None
    ) -> None:
        self._repairing[room] = [] if trigger is None else [trigger]
        self._spawn(self._repair(room, position))

    async def _repair(self, room: str, position: tuple[str, int]) -> None:
        """Read what this node missed from the history once and deliver it in order;
        tell the members with a ``gap`` about what the history no longer has."""
        epoch, last = position
        spec = history_spec(self.policy.policy_for(room))
        page: HistoryPage | None = None
        for attempt in range(REPAIR_ATTEMPTS if spec is not None else 0):
            assert spec is not None
            try:
                page = await self.broker.history(room, spec, since=last)
                if page.epoch == epoch and page.offset < last:
                    # The broker went back in time: offsets this node delivered
                    # would be given to other messages. A new epoch tells everyone.
                    log.warning("room %r: the broker lost messages up to offset %d of epoch "
                                "%s (top now %d); starting a new epoch", room, last, epoch,
                                page.offset)
                    await self.broker.reset_epoch(room, spec, epoch)
                    page = await self.broker.history(room, spec, since=last)
                if page.epoch != epoch:
                    # A new epoch (history lost): what of it is kept is not lost.
                    page = await self.broker.history(room, spec, since=0)
                break
            except Exception as exc:
                log.warning("room %r: cannot read the history after offset %d (%s)",
                            room, last, exc)
                if attempt + 1 < REPAIR_ATTEMPTS and room in self._repairing:
                    await asyncio.sleep(self.repair_retry)
        held = self._repairing.pop(room, None)
        if held is None:
            return  # the room emptied meanwhile
        if page is None:
            if not held:
                # Nothing arrived and nothing could be read: keep the position, so
                # the next publication beyond it starts a repair again.
                return
            # The history cannot be read: what lies before the held ones is lost.
            self.metrics.gap_repairs.labels("lost").inc()
            first = min(held, key=lambda p: (p.epoch != epoch, p.offset or 0))
            assert first.epoch is not None and first.offset is not None
            log.warning("room %r: messages after offset %d cannot be read back; members "
                        "are told to reload", room, last)
            self._positions[room] = (first.epoch, first.offset - 1)
            self._send_gap(room, first.epoch, first.offset - 1)
            current = first.epoch
        else:
            start = 0 if page.epoch != epoch else last
            kept = [p for p in page.publications if p.offset is not None and p.offset > start]
            first_kept = kept[0].offset if kept and kept[0].offset is not None else (
                page.offset + 1)
            if page.epoch != epoch or first_kept > start + 1:
                self.metrics.gap_repairs.labels("lost").inc()
                log.warning("room %r: messages after offset %d of epoch %s are gone; members "
                            "are told to reload", room, last, epoch)
                self._positions[room] = (page.epoch, first_kept - 1)
                self._send_gap(room, page.epoch, first_kept - 1)
            else:
                self.metrics.gap_repairs.labels("repaired").inc()
                log.info("room %r: repaired %d missed message(s) after offset %d",
                         room, len(kept), last)
                self._positions[room] = (page.epoch, start)
            for publication in kept:
                self._deliver_in_order(publication)
            current = page.epoch
        for publication in sorted(held, key=lambda p: p.offset or 0):
            # One of an epoch that is no longer the room's was lost with its
            # history (the gap said so); a hole among the others is repaired anew.
            if publication.epoch == current and room in self._members:
                self.on_publication(publication)

    def _deliver_in_order(self, publication: Publication) -> None:
        room = publication.room
        position = self._positions.get(room)
        if position is not None and position[0] == publication.epoch and (
            publication.offset is None or publication.offset <= position[1]
        ):
            return
        if publication.epoch is not None and publication.offset is not None:
            self._positions[room] = (publication.epoch, publication.offset)
        self._deliver(publication)

    def _send_gap(self, room: str, epoch: str, offset: int) -> None:
        """Tell every member that ``epoch``'s messages up to ``offset`` are gone."""
        message = _gap_message(room, epoch, offset)
        for member, seat in list(self._members.get(room, {}).items()):
            if seat is not None:
                if seat.holding is not None:
                    seat.holding.append(_Gap(epoch, offset))  # after its joined answer
                    continue
                if seat.lag is not None:
                    continue  # its catch-up reads the history and tells it itself
                floor = seat.floor
                if floor is not None:
                    if floor[0] == epoch and floor[1] >= offset:
                        continue  # its answer is already past the gap
                    seat.floor = None
                    self._tidy(member, room, seat)
            if not member.deliver(message) and not member.gone:
                seat = self._seat(member, room)
                if seat is not None:
                    self._set_lag(member, room, seat, _Lag(epoch, offset))

    def on_resubscribed(self, rooms: Sequence[str]) -> None:
        """After an interrupted subscription: repair every room with history."""
        for room in rooms:
            position = self._positions.get(room)
            if position is None:
                floors = [seat.floor for seat in self._members.get(room, {}).values()
                          if seat is not None and seat.floor is not None]
                position = min(floors, key=lambda floor: floor[1]) if floors else None
            if position is not None and room not in self._repairing:
                self._start_repair(room, position, None)
