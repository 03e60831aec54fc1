"""Hub: this node's rooms, and the one way a message reaches their members.

Every join, leave and publish passes through the hub, and every publish goes
through the :class:`~wsserver.brokers.base.Broker`, even in one process: the
broker assigns the room's next offset and calls :meth:`Hub.on_publication` on
every node with members, where the frame is built once and written to each
local member (as Centrifuge's ``hub.broadcastPublication`` does).

Ordering and recovery (rooms with history):

* A joining session is registered as a member *before* its history read, and
  live publications that arrive meanwhile are held for it; after the
  ``joined`` answer it gets only those above the answer's top offset, so
  recovered and live messages never overlap and never leave a hole.
* The node remembers the last offset it delivered per room. A publication
  beyond the next offset (a lost pub/sub message, a re-subscription after a
  Redis outage) makes the node read the missing range from the history once
  and deliver it in order; when the range is gone, members get a ``gap``
  message telling them to reload (the client's ``recovered: false`` path).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wsserver import frames, protocol
from wsserver.access import RoomAccess
from wsserver.brokers.base import (
    Broker,
    HistoryPage,
    HistorySpec,
    NodeStats,
    Presence,
    Publication,
    PublishResult,
)
from wsserver.errors import BadRequest, DisconnectedByServer, RateLimited, RoomFull
from wsserver.metrics import Metrics
from wsserver.protocol import MessageId
from wsserver.ratelimit import BucketTable
from wsserver.rooms import NamespacePolicy, RoomPolicy, validate_room

if TYPE_CHECKING:
    from wsserver.session import Session

log = logging.getLogger("wsserver.hub")

MAX_ROOMS_PER_CONNECTION = 100
#: Seconds a publisher's origin tag waits for its publication to come back.
ORIGIN_TTL = 60.0


def history_spec(policy: NamespacePolicy) -> HistorySpec | None:
    """The broker's history policy for a namespace, None without history."""
    if policy.history_size <= 0:
        return None
    return HistorySpec(policy.history_size, policy.history_ttl)


@dataclass(frozen=True, slots=True)
class _Gap:
    """A ``gap`` held for a joining session, sent after its ``joined`` answer."""

    epoch: str
    offset: int


def _gap_frame(room: str, epoch: str, offset: int) -> bytes:
    return frames.text_frame(protocol.encode(
        {"type": "gap", "room": room, "epoch": epoch, "offset": offset, "recovered": False}
    ))


def _with_id(payload: bytes, msg_id: MessageId) -> bytes:
    """A message's JSON with the publisher's ``id`` added (its own copy)."""
    return b"%s,\"id\":%s}" % (payload[:-1], protocol.encode({"_": msg_id})[5:-1])


class Hub:
    """This node's room membership, fan-out, presence events and recovery."""

    def __init__(
        self,
        broker: Broker,
        policy: RoomPolicy,
        metrics: Metrics,
        access: RoomAccess,
        *,
        node_stats: Callable[[], NodeStats],
        sessions_of: Callable[[str], Sequence[Session]],
        spawn: Callable[[Any], None],
        max_recovery: int = 300,
        max_room_members: int = 10_000,
        room_publish_rate: float = 50.0,
        room_publish_burst: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.policy = policy
        self.metrics = metrics
        #: The join and publish checks (policy, subscription tokens, the backend).
        self.access = access
        self.max_recovery = max_recovery
        self.max_room_members = max_room_members
        #: Client publishes per room: one publish costs a frame per member, so a
        #: room's readers are protected from any one (or every) publisher.
        self.room_buckets: BucketTable[str] = BucketTable(
            room_publish_rate, room_publish_burst, clock
        )
        self._node_stats = node_stats
        self._sessions_of = sessions_of
        self._spawn = spawn
        self._clock = clock
        self._members: dict[str, dict[Session, None]] = {}
        self._rooms_of: dict[Session, set[str]] = {}
        #: Rooms this node subscribed to (or is subscribing to).
        self._subscriptions: dict[str, asyncio.Future[None]] = {}
        #: Per room, the sessions whose join is being answered, and what they missed.
        self._joining: dict[str, dict[Session, list[Publication | _Gap]]] = {}
        #: Origin tag → (publisher, its message id, when), for the publisher's own copy.
        self._origins: dict[str, tuple[Session, MessageId, float]] = {}
        self._origin_serial = 0
        #: Per room with history: (epoch, last offset delivered on this node).
        self._positions: dict[str, tuple[str, int]] = {}
        #: Per room being repaired: publications held until the repair is done.
        self._repairing: dict[str, list[Publication]] = {}

    # --- membership ------------------------------------------------------------

    def rooms_of(self, session: Session) -> set[str]:
        return set(self._rooms_of.get(session, ()))

    def is_member(self, session: Session, room: str) -> bool:
        return room in self._rooms_of.get(session, ())

    def members(self, room: str) -> list[Session]:
        return list(self._members.get(room, ()))

    def __len__(self) -> int:
        return len(self._members)

    async def join(
        self,
        session: Session,
        room: str,
        since: dict[str, Any] | None,
        answer: Callable[[dict[str, Any]], None],
        token: str | None = None,
        data: Any = None,
    ) -> None:
        """Make ``session`` a member of ``room`` and ``answer`` it ``joined``.

        ``token`` (a subscription token) and ``data`` go to the permission
        check (:meth:`RoomAccess.check_join`).

        ``answer`` sends the reply; the publications held for the session during
        the join follow it at once, in order, before any later live one.

        Raises:
            BadRequest: a malformed room name, or too many rooms.
            Forbidden: nothing grants the join.
            BackendError, Unavailable: the subscribe proxy refused, or did not answer.
            BrokerUnavailable: the broker cannot be reached (nothing changed).
        """
        validate_room(room)
        identity = session.identity
        assert identity is not None
        await self.access.check_join(session, room, token, data)
        spec = history_spec(self.policy.policy_for(room))
        rooms = self._rooms_of.get(session, set())
        if room in rooms:
            reply: dict[str, Any] = {"type": "joined", "room": room}
            if spec is not None:
                position = await self.broker.history(room, spec)
                reply.update(epoch=position.epoch, offset=position.offset)
            answer(reply)
            return
        if len(rooms) >= MAX_ROOMS_PER_CONNECTION:
            raise BadRequest(f"at most {MAX_ROOMS_PER_CONNECTION} rooms per connection")
        if len(self._members.get(room, ())) >= self.max_room_members:
            raise RoomFull(f"{room!r} has {self.max_room_members} members on this node")
        await self._subscribe(room)
        if session.closed:
            # Gone while subscribing: a subscription nobody here uses is a leak.
            if room not in self._members:
                self._unsubscribe(room)
            return
        # A member from here on: live publications are held until answered.
        held: list[Publication | _Gap] = []
        self._joining.setdefault(room, {})[session] = held
        self._add(session, room)
        counted = False
        try:
            first = await self.broker.presence_add(room, identity.user)
            counted = True
            page = None if spec is None else await self._history_for_join(room, spec, since)
        except BaseException:
            self._stop_holding(session, room)
            if self._remove(session, room) and counted:
                # Counted in the room's presence, but never a member: uncount it.
                self._spawn(_quietly(self.broker.presence_remove(room, identity.user)))
            raise
        self._stop_holding(session, room)
        if session.closed:
            # Gone during the read: forget() left the room (and counts the
            # presence down); announcing the user now would follow its user_left.
            return
        reply = self._joined_answer(room, page, since)
        answer(reply)
        self._send_held(session, room, held, page)
        if first and self.policy.policy_for(room).join_leave:
            self._spawn(self._event(room, "user_joined", identity.user))

    def _send_held(
        self, session: Session, room: str, held: list[Publication | _Gap],
        page: HistoryPage | None,
    ) -> None:
        """After the ``joined`` answer: what arrived during the join, above its position.

        What is at or below the answer's position is in the answer (or covered
        by its ``recovered: false``). A publication of another epoch than the
        answer's means the history was lost after the read: the client is told
        with a ``gap`` first, as live members were.
        """
        epoch = page.epoch if page is not None else None
        top = page.offset if page is not None else 0
        for item in held:
            if isinstance(item, _Gap):
                if item.epoch == epoch and item.offset <= top:
                    continue  # the answer is already past this gap
                session.send_frame(_gap_frame(room, item.epoch, item.offset))
                epoch, top = item.epoch, item.offset
                continue
            if epoch is not None and item.offset is not None and item.epoch is not None:
                if item.epoch == epoch and item.offset <= top:
                    continue
                if item.epoch != epoch:
                    session.send_frame(_gap_frame(room, item.epoch, item.offset - 1))
                    epoch = item.epoch
                top = item.offset
            session.send_frame(frames.text_frame(item.payload))

    def _stop_holding(self, session: Session, room: str) -> None:
        joining = self._joining.get(room)
        if joining is not None:
            joining.pop(session, None)
            if not joining:
                del self._joining[room]

    async def _history_for_join(
        self, room: str, spec: HistorySpec, since: dict[str, Any] | None
    ) -> HistoryPage:
        if since is None:
            page = await self.broker.history(room, spec)
        else:
            page = await self.broker.history(
                room, spec, since=since["offset"], limit=self.max_recovery + 1
            )
        self._note_position(room, page.epoch, page.offset)
        return page

    def _joined_answer(
        self, room: str, page: HistoryPage | None, since: dict[str, Any] | None
    ) -> dict[str, Any]:
        if page is None:
            return {"type": "joined", "room": room}
        answer: dict[str, Any] = {"type": "joined", "room": room, "epoch": page.epoch,
                                  "offset": page.offset}
        if since is None:
            return answer
        recovered = (
            since["epoch"] == page.epoch
            and page.complete
            and len(page.publications) <= self.max_recovery
        )
        answer["recovered"] = recovered
        if recovered:
            answer["messages"] = protocol.RawJSONList([p.payload for p in page.publications])
            self.metrics.recoveries.labels("recovered").inc()
        else:
            answer["messages"] = []
            self.metrics.recoveries.labels("lost").inc()
        return answer

    async def leave(self, session: Session, room: str) -> None:
        """Remove ``session`` from ``room`` (no error when it was not a member)."""
        if not self._remove(session, room):
            return
        await self._after_leave(session, room)

    async def _after_leave(self, session: Session, room: str) -> None:
        identity = session.identity
        if identity is None:
            return
        last = await self.broker.presence_remove(room, identity.user)
        if last and self.policy.policy_for(room).join_leave:
            await self._event(room, "user_left", identity.user)

    def forget(self, session: Session) -> None:
        """``session`` is gone: leave every room now, tell the broker later."""
        rooms = self._rooms_of.get(session, set())
        for room in list(rooms):
            self._remove(session, room)
            self._spawn(_quietly(self._after_leave(session, room)))
        for joining in self._joining.values():
            joining.pop(session, None)
        for tag in [t for t, (s, _, _) in self._origins.items() if s is session]:
            del self._origins[tag]

    async def recheck_grants(self, session: Session) -> None:
        """After a refresh: leave the rooms the new token no longer grants."""
        identity = session.identity
        if identity is None:
            return
        for room in sorted(self.rooms_of(session)):
            if not self.access.may_stay(session, room):
                self._remove(session, room)
                session.send({"type": "left", "room": room, "reason": "forbidden"})
                await _quietly(self._after_leave(session, room))

    def _add(self, session: Session, room: str) -> None:
        self._rooms_of.setdefault(session, set()).add(room)
        self._members.setdefault(room, {})[session] = None

    def _remove(self, session: Session, room: str) -> bool:
        rooms = self._rooms_of.get(session)
        if not rooms or room not in rooms:
            return False
        rooms.discard(room)
        self.access.forget_room(session, room)
        if not rooms:
            del self._rooms_of[session]
        members = self._members[room]
        del members[session]
        if not members:
            del self._members[room]
            self._unsubscribe(room)
        return True

    async def _subscribe(self, room: str) -> None:
        future = self._subscriptions.get(room)
        if future is None:
            future = asyncio.ensure_future(self.broker.subscribe(room))
            self._subscriptions[room] = future
        try:
            await asyncio.shield(future)
        except BaseException:
            if self._subscriptions.get(room) is future and room not in self._members:
                del self._subscriptions[room]
            raise

    def _unsubscribe(self, room: str) -> None:
        future = self._subscriptions.pop(room, None)
        self._positions.pop(room, None)
        self._repairing.pop(room, None)
        if future is not None:
            self._spawn(_quietly(self._unsubscribe_after(future, room)))

    async def _unsubscribe_after(self, future: asyncio.Future[None], room: str) -> None:
        await future
        if room not in self._subscriptions:
            await self.broker.unsubscribe(room)

    # --- publishing ------------------------------------------------------------

    async def publish_from(
        self, session: Session, room: str, data: Any, msg_id: MessageId | None
    ) -> None:
        """A client's publish: checked, then through the broker to every member."""
        validate_room(room)
        identity = session.identity
        assert identity is not None
        if not self.is_member(session, room):
            raise BadRequest(f"join room {room!r} before publishing to it")
        data = await self.access.check_publish(session, room, data)
        wait = self.room_buckets.take(room)
        if wait:
            self.metrics.rejections.labels("room_rate").inc()
            raise RateLimited(wait, f"publish rate of room {room!r} exceeded")
        message = protocol.encode(
            {"type": "message", "room": room, "from": identity.user, "data": data}
        )
        origin = None
        if msg_id is not None:
            self._origin_serial += 1
            origin = f"{self.broker.node_name}/{self._origin_serial}"
            self._origins[origin] = (session, msg_id, self._clock())
        spec = history_spec(self.policy.policy_for(room))
        try:
            await self.broker.publish(room, message, history=spec, origin=origin)
        except BaseException:
            if origin is not None:
                self._origins.pop(origin, None)
            raise

    async def publish(
        self, room: str, data: Any, *, idempotency_key: str | None = None
    ) -> PublishResult:
        """The server API's publish: ``from`` is null."""
        validate_room(room)
        message = protocol.encode({"type": "message", "room": room, "from": None, "data": data})
        spec = history_spec(self.policy.policy_for(room))
        return await self.broker.publish(
            room, message, history=spec, idempotency_key=idempotency_key
        )

    async def _event(self, room: str, kind: str, user: str) -> None:
        payload = protocol.encode({"type": kind, "room": room, "user": user})
        await _quietly(self.broker.publish(room, payload))

    # --- the broker's callbacks (BrokerSink) -----------------------------------

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
            position = self._positions.get(room)
            if position is not None and position[0] == publication.epoch:
                last = position[1]
                if publication.offset <= last:
                    return  # already delivered (a repair read it first)
                if publication.offset > last + 1:
                    self._start_repair(room, position, publication)
                    return
            elif position is not None:
                log.warning("room %r: epoch changed %s → %s; members are told to reload",
                            room, position[0], publication.epoch)
                self._send_gap(room, publication.epoch, publication.offset - 1)
            self._positions[room] = (publication.epoch, publication.offset)
        self._deliver(publication)

    def _deliver(self, publication: Publication) -> None:
        room = publication.room
        members = self._members.get(room)
        if not members:
            return
        frame = frames.text_frame(publication.payload)
        own = self._origins.pop(publication.origin, None) if publication.origin else None
        joining = self._joining.get(room)
        delivered = 0
        for member in list(members):
            if joining is not None and member in joining:
                joining[member].append(publication)
            elif own is not None and member is own[0]:
                delivered += member.send_frame(
                    frames.text_frame(_with_id(publication.payload, own[1]))
                )
            else:
                delivered += member.send_frame(frame)
        self.metrics.deliveries.inc(delivered)

    def _note_position(self, room: str, epoch: str, offset: int) -> None:
        if room not in self._members and room not in self._subscriptions:
            return
        position = self._positions.get(room)
        if position is None or (position[0] == epoch and position[1] < offset):
            self._positions[room] = (epoch, offset)

    def _start_repair(
        self, room: str, position: tuple[str, int], trigger: Publication | None
    ) -> None:
        self._repairing[room] = [] if trigger is None else [trigger]
        self._spawn(self._repair(room, position))

    async def _repair(self, room: str, position: tuple[str, int]) -> None:
        """Read the missed range from the history once and deliver it in order."""
        epoch, last = position
        spec = history_spec(self.policy.policy_for(room))
        page: HistoryPage | None = None
        if spec is not None:
            try:
                page = await self.broker.history(room, spec, since=last)
            except Exception as exc:
                log.warning("room %r: cannot repair a gap after offset %d: %s", room, last, exc)
        held = self._repairing.pop(room, None)
        if held is None:
            return  # the room emptied meanwhile
        if page is None and not held:
            # Nothing arrived and nothing could be read: keep the position, so
            # the next publication beyond it starts a repair again.
            return
        if page is not None and page.epoch == epoch and page.complete:
            self.metrics.gap_repairs.labels("repaired").inc()
            log.info("room %r: repaired %d missed message(s) after offset %d",
                     room, len(page.publications), last)
            for publication in page.publications:
                self._deliver_in_order(publication)
        else:
            self.metrics.gap_repairs.labels("lost").inc()
            new_epoch = page.epoch if page is not None else epoch
            top = page.offset if page is not None else max((p.offset or 0) for p in held)
            log.warning("room %r: messages after offset %d are gone; members are told to "
                        "reload", room, last)
            self._send_gap(room, new_epoch, top)
            self._positions[room] = (new_epoch, top)
        for publication in sorted(held, key=lambda p: p.offset or 0):
            self._deliver_in_order(publication)

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
        frame = _gap_frame(room, epoch, offset)
        joining = self._joining.get(room, {})
        for member in self.members(room):
            held = joining.get(member)
            if held is not None:
                held.append(_Gap(epoch, offset))  # after its joined answer, not before
            else:
                member.send_frame(frame)

    def on_resubscribed(self, rooms: Sequence[str]) -> None:
        """After an interrupted subscription: repair every room with history."""
        for room in rooms:
            position = self._positions.get(room)
            if position is not None and room not in self._repairing:
                self._start_repair(room, position, None)

    def on_disconnect(self, user: str, code: int, reason: str) -> None:
        for session in list(self._sessions_of(user)):
            session.end(DisconnectedByServer(reason or None, code))

    def on_presence_lost(self, room: str, user: str) -> None:
        if self.policy.policy_for(room).join_leave and room in self._members:
            frame = frames.text_frame(
                protocol.encode({"type": "user_left", "room": room, "user": user})
            )
            for member in self.members(room):
                member.send_frame(frame)

    def node_stats(self) -> NodeStats:
        return self._node_stats()

    # --- reading -----------------------------------------------------------------

    async def presence_for(self, session: Session, room: str) -> Presence:
        """A member's presence request (namespaces with ``presence = true``)."""
        validate_room(room)
        identity = session.identity
        assert identity is not None
        if not self.policy.policy_for(room).presence:
            raise BadRequest(f"presence is not enabled for {room!r}")
        if not self.is_member(session, room) and not self.policy.can_join(
            identity.user, identity.grants, room
        ):
            raise session.forbidden(f"not allowed to see who is in {room!r}")
        return await self.broker.presence(room)

    def sweep(self) -> None:
        """Forget refilled room buckets and origin tags whose publication never came back."""
        self.room_buckets.sweep()
        cutoff = self._clock() - ORIGIN_TTL
        for tag in [t for t, (_, _, at) in self._origins.items() if at < cutoff]:
            del self._origins[tag]


async def _quietly(awaitable: Any) -> None:
    """Await a broker call whose failure is logged, not raised (clean-ups, events)."""
    try:
        await awaitable
    except Exception as exc:
        log.warning("broker call failed: %s", exc)
