"""Hub: this node's rooms, and the one way a message reaches their members.

Every join, leave and publish passes through the hub, and every publish goes
through the :class:`~wsserver.brokers.base.Broker`, even in one process: the
broker assigns the room's next offset and calls :meth:`Hub.on_publication` on
every node with members, where :class:`~wsserver.delivery.Delivery` hands it
to each local member once, in order, or tells the member what it missed.

The hub decides who may be where (the room policy, subscription tokens and
the backend through :class:`~wsserver.access.RoomAccess`), subscribes this
node to the rooms its members are in, charges the rooms' publish buckets and
keeps presence: the broker's side of a membership.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from wsserver import protocol
from wsserver.access import RoomAccess
from wsserver.brokers.base import (
    Broker,
    BrokerUnavailable,
    HistoryPage,
    HistorySpec,
    NodeStats,
    Presence,
    Publication,
    PublishResult,
)
from wsserver.delivery import Delivery, Member, history_spec
from wsserver.errors import BadRequest, DisconnectedByServer, RateLimited, RoomFull
from wsserver.metrics import Metrics
from wsserver.protocol import MessageId
from wsserver.ratelimit import BucketTable
from wsserver.rooms import RoomPolicy, validate_room
from wsserver.transport import Prepared

__all__ = ["MAX_ROOMS_PER_CONNECTION", "Hub", "Member", "history_spec"]

log = logging.getLogger("wsserver.hub")

MAX_ROOMS_PER_CONNECTION = 100


class Hub:
    """This node's room membership, publishing, presence events and the broker's callbacks."""

    def __init__(
        self,
        broker: Broker,
        policy: RoomPolicy,
        metrics: Metrics,
        access: RoomAccess,
        *,
        node_stats: Callable[[], NodeStats],
        sessions_of: Callable[[str], Sequence[Member]],
        spawn: Callable[[Any], None],
        max_recovery: int = 300,
        max_recovery_bytes: int = 4 * 1024 * 1024,
        max_room_members: int = 10_000,
        room_publish_rate: float = 50.0,
        room_publish_burst: int = 100,
        room_publish_bytes: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.policy = policy
        self.metrics = metrics
        #: The join and publish checks (policy, subscription tokens, the backend).
        self.access = access
        self.max_recovery = max_recovery
        self.max_room_members = max_room_members
        #: Each room's members, and every message's way to them.
        self.delivery = Delivery(
            broker, policy, metrics, spawn=spawn, max_recovery=max_recovery,
            max_recovery_bytes=max_recovery_bytes, clock=clock,
        )
        #: Client publishes per room: one publish costs a message per member, so a
        #: room's readers are protected from any one (or every) publisher.
        self.room_buckets: BucketTable[str] = BucketTable(
            room_publish_rate, room_publish_burst, clock
        )
        #: The same in bytes: many members' links are only as fast as each one's,
        #: so one publisher of big messages must not fill them all (None: off).
        self.room_byte_buckets: BucketTable[str] | None = None
        if room_publish_bytes:
            self.room_byte_buckets = BucketTable(
                room_publish_bytes, 2 * room_publish_bytes, clock
            )
        self._node_stats = node_stats
        self._sessions_of = sessions_of
        self._spawn = spawn
        #: Rooms this node subscribed to (or is subscribing to).
        self._subscriptions: dict[str, asyncio.Future[None]] = {}

    # --- membership ------------------------------------------------------------

    def rooms_of(self, session: Member) -> set[str]:
        return self.delivery.rooms_of(session)

    def is_member(self, session: Member, room: str) -> bool:
        return self.delivery.is_member(session, room)

    def members(self, room: str) -> list[Member]:
        return self.delivery.members(room)

    def lagging(self, session: Member, room: str) -> bool:
        """True while ``session`` skips ``room``'s live messages (see :mod:`wsserver.delivery`)."""
        return self.delivery.lagging(session, room)

    def __len__(self) -> int:
        return len(self.delivery)

    async def join(
        self,
        session: Member,
        room: str,
        since: dict[str, Any] | None,
        answer: Callable[[dict[str, Any]], None],
        token: str | None = None,
        data: Any = None,
    ) -> None:
        """Make ``session`` a member of ``room`` and ``answer`` it ``joined``.

        ``token`` (a subscription token) and ``data`` go to the permission
        check (:meth:`RoomAccess.check_join`).

        ``answer`` sends the reply; what the answer leaves pending and the
        publications held for the session during the join follow it, in order,
        before any later live one.

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
        delivery = self.delivery
        rooms = delivery.rooms_of(session)
        if room in rooms:
            reply: dict[str, Any] = {"type": "joined", "room": room}
            if spec is not None:
                position = await self.broker.history(room, spec)
                reply.update(epoch=position.epoch, offset=position.offset)
            answer(reply)
            return
        if len(rooms) >= MAX_ROOMS_PER_CONNECTION:
            raise BadRequest(f"at most {MAX_ROOMS_PER_CONNECTION} rooms per connection")
        if delivery.count(room) >= self.max_room_members:
            raise RoomFull(f"{room!r} has {self.max_room_members} members on this node")
        await self._subscribe(room)
        if session.closed:
            # Gone while subscribing: a subscription nobody here uses is a leak.
            if not delivery.has_room(room):
                self._unsubscribe(room)
            return
        # A member from here on: live publications are held until answered.
        seat = delivery.hold(session, room)
        counted = False
        try:
            first = await self.broker.presence_add(room, identity.user)
            counted = True
            page = None if spec is None else await self._history_for_join(room, spec, since)
        except BaseException:
            if self._remove(session, room) and counted:
                # Counted in the room's presence, but never a member: uncount it.
                self._spawn(_quietly(self.broker.presence_remove(room, identity.user)))
            raise
        if session.closed or not delivery.holds(session, room, seat):
            # Gone during the read: forget() left the room (and counts the
            # presence down); announcing the user now would follow its user_left.
            return
        delivery.answer_join(session, room, seat, page, since, answer)
        if first and self.policy.policy_for(room).join_leave:
            self._spawn(self._event(room, "user_joined", identity.user))

    async def _history_for_join(
        self, room: str, spec: HistorySpec, since: dict[str, Any] | None
    ) -> HistoryPage:
        if since is None:
            return await self.broker.history(room, spec)
        return await self.broker.history(
            room, spec, since=since["offset"], limit=self.max_recovery + 1
        )

    # --- leaving -----------------------------------------------------------------

    async def leave(self, session: Member, room: str) -> None:
        """Remove ``session`` from ``room`` (no error when it was not a member).

        Never refused: the member is gone from the room at once, and with the
        broker down its presence entry is put right when the broker is back
        (the Redis broker replaces this node's entries after an outage).
        """
        if not self._remove(session, room):
            return
        await _quietly(self._after_leave(session, room))

    async def _after_leave(self, session: Member, room: str) -> None:
        identity = session.identity
        if identity is None:
            return
        last = await self.broker.presence_remove(room, identity.user)
        if last and self.policy.policy_for(room).join_leave:
            await self._event(room, "user_left", identity.user)

    def forget(self, session: Member) -> None:
        """``session`` is gone: leave every room now, tell the broker later."""
        for room in sorted(self.delivery.rooms_of(session)):
            self._remove(session, room)
            self._spawn(_quietly(self._after_leave(session, room)))
        self.delivery.forget(session)

    async def recheck_grants(self, session: Member) -> None:
        """After a refresh: leave the rooms the new token no longer grants."""
        identity = session.identity
        if identity is None:
            return
        for room in sorted(self.rooms_of(session)):
            if not self.access.may_stay(session, room):
                self._remove(session, room)
                session.send_prepared(Prepared(protocol.encode(
                    {"type": "left", "room": room, "reason": "forbidden"})))
                await _quietly(self._after_leave(session, room))

    def _remove(self, session: Member, room: str) -> bool:
        if not self.delivery.remove(session, room):
            return False
        self.access.forget_room(session, room)
        if not self.delivery.has_room(room):
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
            if self._subscriptions.get(room) is future and not self.delivery.has_room(room):
                del self._subscriptions[room]
            raise

    def _unsubscribe(self, room: str) -> None:
        future = self._subscriptions.pop(room, None)
        self.delivery.forget_room(room)
        if future is not None:
            self._spawn(_quietly(self._unsubscribe_after(future, room)))

    async def _unsubscribe_after(self, future: asyncio.Future[None], room: str) -> None:
        await future
        if room not in self._subscriptions:
            await self.broker.unsubscribe(room)

    # --- publishing ------------------------------------------------------------

    async def publish_from(
        self, session: Member, room: str, data: Any, msg_id: MessageId | None,
        idempotency_key: str | None = None,
    ) -> PublishResult:
        """A client's publish: checked, then through the broker to every member.

        With ``idempotency_key``, the same key from the same user for the same
        room within :data:`~wsserver.brokers.base.IDEMPOTENCY_TTL` publishes
        once: a repeat answers ``duplicate`` and the first publish's position.
        """
        validate_room(room)
        identity = session.identity
        assert identity is not None
        if not self.is_member(session, room):
            raise BadRequest(f"join room {room!r} before publishing to it")
        data = await self.access.check_publish(session, room, data)
        message = protocol.encode(
            {"type": "message", "room": room, "from": identity.user, "data": data}
        )
        wait = self.room_buckets.take(room)
        byte_buckets = self.room_byte_buckets
        if not wait and byte_buckets is not None:
            # A message bigger than the burst costs a full bucket, not forever.
            wait = byte_buckets.take(room, min(len(message), byte_buckets.burst))
        if wait:
            self.metrics.rejections.labels("room_rate").inc()
            raise RateLimited(wait, f"publish rate of room {room!r} exceeded")
        origin = None if msg_id is None else self.delivery.remember_origin(session, msg_id)
        spec = history_spec(self.policy.policy_for(room))
        key = None if idempotency_key is None else (
            protocol.client_idempotency_key(identity.user, idempotency_key))
        try:
            result = await self.broker.publish(
                room, message, history=spec, origin=origin, idempotency_key=key)
        except BrokerUnavailable:
            # The outcome may be unknown (a batch that timed out may still be
            # applied once Redis answers): the tag stays until swept, so that
            # if the publication comes after all, the sender's copy carries its
            # id and the client can tell (docs/protocol.md, "unavailable").
            raise
        except BaseException:
            if origin is not None:
                self.delivery.drop_origin(origin)
            raise
        if result.duplicate and origin is not None:
            self.delivery.drop_origin(origin)
        return result

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
        """Publish a ``user_joined`` / ``user_left`` event, charged to the room's
        publish bucket like a client's message: a join/leave loop must not flood a
        big room. Past the bucket the event is shed (counted; presence stays exact)."""
        if self.room_buckets.take(room):
            self.metrics.rejections.labels("room_event_shed").inc()
            return
        payload = protocol.encode({"type": kind, "room": room, "user": user})
        await _quietly(self.broker.publish(room, payload))

    # --- the broker's callbacks (BrokerSink) -----------------------------------

    def on_publication(self, publication: Publication) -> None:
        """A publication in a room with members here: deliver it once to each."""
        self.delivery.on_publication(publication)

    def on_resubscribed(self, rooms: Sequence[str]) -> None:
        """After an interrupted subscription: repair every room with history."""
        self.delivery.on_resubscribed(rooms)

    def on_disconnect(self, user: str, code: int, reason: str) -> None:
        for session in list(self._sessions_of(user)):
            session.end(DisconnectedByServer(reason or None, code))

    def on_presence_lost(self, room: str, user: str) -> None:
        if self.policy.policy_for(room).join_leave and self.delivery.has_room(room):
            self.delivery.deliver_event(room, protocol.encode(
                {"type": "user_left", "room": room, "user": user}))

    def node_stats(self) -> NodeStats:
        return self._node_stats()

    # --- reading -----------------------------------------------------------------

    async def presence_for(self, session: Member, room: str) -> Presence:
        """A member's presence request (namespaces with ``presence = true``)."""
        validate_room(room)
        identity = session.identity
        assert identity is not None
        if not self.is_member(session, room) and not self.policy.can_join(
            identity.user, identity.grants, room
        ):
            raise session.forbidden(f"not allowed to see who is in {room!r}")
        if not self.policy.policy_for(room).presence:
            raise BadRequest(f"presence is not enabled for {room!r}")
        return await self.broker.presence(room)

    def sweep(self) -> None:
        """Forget refilled room buckets and origin tags whose publication never came back."""
        self.room_buckets.sweep()
        if self.room_byte_buckets is not None:
            self.room_byte_buckets.sweep()
        self.delivery.sweep()


async def _quietly(awaitable: Any) -> None:
    """Await a broker call whose failure is logged, not raised (clean-ups, events)."""
    try:
        await awaitable
    except Exception as exc:
        log.warning("broker call failed: %s", exc)
