"""The client's protocol state, without I/O: what each server message means.

:class:`ClientMachine` is fed the server's text frames (:meth:`ClientMachine.receive`)
and the end of each connection (:meth:`ClientMachine.connection_lost`), and
answers with :mod:`events <wsserver.client.machine>` for the I/O layer to act
on; it builds the messages to send (:meth:`request`, :meth:`join`,
:meth:`rejoins`) but sends nothing. It keeps what must survive a reconnect:
the rooms, their positions, the user. The I/O layer
(:mod:`wsserver.client.connection`) owns sockets, timers and the caller's
futures. As python-websockets does with its sans-I/O protocol, this keeps every
decision testable in memory (``tests/unit/test_client_machine.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from wsserver.client.decisions import (
    accept_message,
    gap_outcome,
    join_message,
    joined_outcome,
    position_of,
)
from wsserver.client.errors import ClientError, ConnectionLost, ServerError, server_error
from wsserver.client.messages import Gap, Json, Message, Position

#: Error codes of a refused re-join that are worth another try on the same
#: connection (the position is kept); any other refusal loses the room.
RETRY_JOIN_CODES = frozenset({"unavailable", "rate_limited", "room_full", "internal_error"})

RequestKind = Literal["request", "publish", "join", "leave", "refresh"]


# --- events: what the I/O layer acts on -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcomed:
    """The connection is authenticated; re-join the rooms (:meth:`ClientMachine.rejoins`)."""

    user: str
    expires_at: float | None
    limits: Json


@dataclass(frozen=True, slots=True)
class Replied:
    """The reply to request ``id`` (a publish's reply is the sender's own copy)."""

    id: str
    message: Json


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """Request ``id`` failed: an ``error`` reply, or the connection dropped."""

    id: str
    error: ClientError


@dataclass(frozen=True, slots=True)
class Joined:
    """``room`` is joined on this connection; ``recovered`` as the reply said
    (None when the join did not ask), ``missed`` messages recovered, of which
    ``pending`` follow the reply as ordinary messages."""

    room: str
    id: str
    reply: Json
    recovered: bool | None
    missed: int
    pending: int = 0


@dataclass(frozen=True, slots=True)
class JoinRefused:
    """The join ``id`` of ``room`` was refused. ``retry``: a re-join worth
    sending again later (position kept); ``dropped``: the room is forgotten."""

    room: str
    id: str
    error: ServerError
    retry: bool
    dropped: bool
    rejoin: bool


@dataclass(frozen=True, slots=True)
class Delivered:
    """The next item of ``room``'s stream, in the room's order."""

    room: str
    item: Message | Gap


@dataclass(frozen=True, slots=True)
class RoomLeft:
    """The server took the client out of ``room`` (``left`` with a ``reason``)."""

    room: str
    reason: str


@dataclass(frozen=True, slots=True)
class TokenExpiring:
    """The token expires soon: answer with a ``refresh`` carrying a new one."""

    expires_at: float | None


@dataclass(frozen=True, slots=True)
class Unsolicited:
    """A server message no request waits for and no room takes
    (``user_joined``, ``user_left``, an error without a known ``id``...)."""

    message: Json


Event = (Welcomed | Replied | RequestFailed | Joined | JoinRefused | Delivered | RoomLeft
         | TokenExpiring | Unsolicited)


# --- state --------------------------------------------------------------------------------


@dataclass(slots=True)
class RoomState:
    """One room the client is in (or joining), kept across reconnects."""

    name: str
    position: Position | None = None
    #: The join in flight on this connection, and whether it carries ``since``.
    join_id: str | None = None
    asked: bool = False
    #: Answered on this connection.
    joined: bool = False
    #: Answered at least once: a refused re-join then loses the room.
    ever_joined: bool = False
    #: Messages and gaps held until the recovering join is answered, or until
    #: the pending recovered messages are in.
    held: list[Json] = field(default_factory=list)
    #: While recovered messages still follow the ``joined`` reply: the last one's position.
    backfill_to: Position | None = None

    @property
    def recovering(self) -> bool:
        """A join asking for missed messages is in flight: live ones wait behind it."""
        return self.join_id is not None and self.asked and not self.joined


@dataclass(frozen=True, slots=True)
class _Pending:
    kind: RequestKind
    room: str | None = None


class ClientMachine:
    """One client's protocol state across its connections; no I/O.

    Attributes:
        user: the ``sub`` of the last ``welcome``.
        expires_at: the token's expiry (unix seconds) from ``welcome`` / ``refreshed``.
        limits: the ``limits`` of the last ``welcome``.
        rooms: the rooms to be in, re-joined after every reconnect.
    """

    def __init__(self) -> None:
        self.user: str | None = None
        self.expires_at: float | None = None
        self.limits: Json = {}
        self.rooms: dict[str, RoomState] = {}
        self._pending: dict[str, _Pending] = {}
        self._next_id = 0

    # --- what to send ---------------------------------------------------------------

    def next_id(self) -> str:
        """A fresh request id (``c1``, ``c2``...)."""
        self._next_id += 1
        return f"c{self._next_id}"

    def request(self, message: Json, kind: RequestKind = "request") -> Json:
        """``message`` with a fresh ``id``, registered so its reply is matched.

        Call it right before sending: a registered request counts as sent, and
        fails with :class:`ConnectionLost` when the connection drops.
        """
        msg_id = self.next_id()
        room = message.get("room") if kind == "publish" else None
        self._pending[msg_id] = _Pending(kind, room if isinstance(room, str) else None)
        return {**message, "id": msg_id}

    def join(self, room: str, since: Position | None = None) -> Json:
        """The ``join`` of a room the caller asked for, registered; ``since`` resumes from there."""
        state = self.rooms.get(room)
        if state is None:
            state = self.rooms[room] = RoomState(room, since)
        elif since is not None:
            state.position = since
        return self._join(state)

    def rejoins(self) -> list[Json]:
        """After ``welcome``: a ``join`` for every room, with ``since`` where known."""
        return [self._join(state) for state in self.rooms.values() if state.join_id is None]

    def rejoin(self, room: str) -> Json | None:
        """Another try of a refused re-join (``retry``), unless the room is gone or joining."""
        state = self.rooms.get(room)
        if state is None or state.join_id is not None or state.joined:
            return None
        return self._join(state)

    def _join(self, state: RoomState) -> Json:
        msg = join_message(state.name, state.position)
        msg_id = self.next_id()
        self._pending[msg_id] = _Pending("join", state.name)
        state.join_id, state.asked, state.joined = msg_id, "since" in msg, False
        state.held.clear()
        return {**msg, "id": msg_id}

    def leave(self, room: str) -> Json:
        """Forget ``room`` now (nothing more is delivered) and the ``leave`` to send."""
        self.rooms.pop(room, None)
        return self.request({"type": "leave", "room": room}, "leave")

    def forget(self, room: str) -> None:
        """Forget ``room`` without telling the server (it forgot it already)."""
        self.rooms.pop(room, None)

    def position(self, room: str) -> Position | None:
        state = self.rooms.get(room)
        return state.position if state is not None else None

    @property
    def in_flight(self) -> int:
        """Requests sent on this connection and not yet answered."""
        return len(self._pending)

    # --- what arrives -----------------------------------------------------------------

    def connection_lost(self) -> list[Event]:
        """The connection ended: every request in flight fails (the server
        forgot it), except joins, which the next ``welcome`` sends again."""
        events: list[Event] = []
        for msg_id, pending in self._pending.items():
            if pending.kind != "join":
                events.append(RequestFailed(msg_id, ConnectionLost(
                    "the connection dropped before the reply; the request may have been served"
                )))
        self._pending.clear()
        for state in self.rooms.values():
            # What was held is recovered by the re-join: the position did not move past it.
            state.join_id, state.asked, state.joined = None, False, False
            state.held.clear()
            state.backfill_to = None
        return events

    def receive(self, text: str) -> list[Event]:
        """The events one server text frame means (nothing for what is not a JSON object)."""
        try:
            msg = json.loads(text)
        except ValueError:
            return []
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return []
        return list(self._dispatch(msg))

    def _dispatch(self, msg: Json) -> Iterator[Event]:
        kind = msg["type"]
        raw_id = msg.get("id")
        msg_id = raw_id if isinstance(raw_id, str) else ""
        pending = self._pending.get(msg_id)
        if kind == "welcome":
            yield from self._on_welcome(msg)
        elif kind == "message":
            if pending is not None and pending.kind == "publish" and msg.get("from") == self.user:
                del self._pending[msg_id]
                yield Replied(msg_id, msg)
            yield from self._on_room_item(msg)
        elif kind == "published" and pending is not None and pending.kind == "publish":
            # A repeated idempotency key: no copy comes, this answers the publish.
            del self._pending[msg_id]
            yield Replied(msg_id, msg)
        elif kind == "gap":
            yield from self._on_room_item(msg)
        elif kind == "joined" and pending is not None and pending.kind == "join":
            del self._pending[msg_id]
            yield from self._on_joined(msg_id, msg)
        elif kind == "left" and isinstance(msg.get("reason"), str) and pending is None:
            room = msg.get("room")
            if isinstance(room, str) and self.rooms.pop(room, None) is not None:
                yield RoomLeft(room, msg["reason"])
        elif kind == "error" and pending is not None:
            del self._pending[msg_id]
            error = server_error(msg)
            if pending.kind == "join" and pending.room is not None:
                yield from self._on_join_refused(msg_id, pending.room, error)
            else:
                yield RequestFailed(msg_id, error)
        elif kind == "token_expiring":
            yield TokenExpiring(_number(msg.get("expires_at")))
        elif pending is not None:
            del self._pending[msg_id]
            if kind == "refreshed":
                self.expires_at = _number(msg.get("expires_at"))
            yield Replied(msg_id, msg)
        else:
            yield Unsolicited(msg)

    def _on_welcome(self, msg: Json) -> Iterator[Event]:
        user = msg.get("user")
        self.user = user if isinstance(user, str) else None
        self.expires_at = _number(msg.get("expires_at"))
        limits = msg.get("limits")
        self.limits = limits if isinstance(limits, dict) else {}
        yield Welcomed(self.user or "", self.expires_at, self.limits)

    def _on_joined(self, msg_id: str, reply: Json) -> Iterator[Event]:
        room = reply.get("room")
        state = self.rooms.get(room) if isinstance(room, str) else None
        if state is None or state.join_id != msg_id:
            return  # left meanwhile
        outcome = joined_outcome(state.position, reply, state.asked)
        state.join_id, state.joined, state.ever_joined = None, True, True
        state.position = outcome.position
        state.backfill_to = (
            Position(outcome.position.epoch, outcome.backfill_to)
            if outcome.backfill_to is not None and outcome.position is not None else None
        )
        yield Joined(state.name, msg_id, reply, outcome.recovered,
                     len(outcome.messages) + outcome.pending, outcome.pending)
        if outcome.recovered is False:
            top = position_of(reply)
            yield Delivered(state.name, Gap(
                state.name, "recovery_failed", top.epoch if top else None,
                top.offset if top else None, raw=reply,
            ))
        for recovered in outcome.messages:
            yield Delivered(state.name, Message.from_json(recovered))
        yield from self._release_held(state)

    def _on_join_refused(self, msg_id: str, room: str, error: ServerError) -> Iterator[Event]:
        state = self.rooms.get(room)
        if state is None or state.join_id != msg_id:
            return
        state.join_id = None
        state.held.clear()
        rejoin = state.ever_joined
        retry = rejoin and error.code in RETRY_JOIN_CODES
        if not retry:
            del self.rooms[room]
        yield JoinRefused(room, msg_id, error, retry=retry, dropped=not retry, rejoin=rejoin)

    def _on_room_item(self, msg: Json) -> Iterator[Event]:
        """A ``message`` or ``gap`` for a room, in the room's order."""
        room = msg.get("room")
        state = self.rooms.get(room) if isinstance(room, str) else None
        if state is None:
            return  # not ours, or left
        if state.recovering or self._beyond_backfill(state, msg):
            state.held.append(msg)
            return
        if msg["type"] == "gap":
            yield from self._on_gap(state, msg)
        else:
            yield from self._on_message(state, msg)
        if state.backfill_to is not None and self._backfill_done(state):
            state.backfill_to = None
            yield from self._release_held(state)

    def _on_message(self, state: RoomState, msg: Json) -> Iterator[Event]:
        verdict = accept_message(state.position, msg)
        at = position_of(msg)
        if verdict.hole and at is not None:
            yield Delivered(state.name, Gap(state.name, "hole", at.epoch, at.offset - 1, raw=msg))
        state.position = verdict.position
        if verdict.deliver:
            yield Delivered(state.name, Message.from_json(msg))

    def _on_gap(self, state: RoomState, msg: Json) -> Iterator[Event]:
        dropped = msg.get("dropped")
        at = position_of(msg)
        if at is None:
            yield Delivered(state.name, Gap(
                state.name, "gap", dropped=dropped if isinstance(dropped, int) else None, raw=msg,
            ))
            return
        position, lost = gap_outcome(state.position, msg)
        if lost:
            state.position = position
            yield Delivered(state.name, Gap(state.name, "gap", at.epoch, at.offset, raw=msg))

    def _release_held(self, state: RoomState) -> Iterator[Event]:
        """Deliver what waited for the join's answer or for the recovered messages."""
        while state.held and state.name in self.rooms and not state.recovering:
            if self._beyond_backfill(state, state.held[0]):
                return
            item = state.held.pop(0)
            yield from self._on_room_item(item)

    @staticmethod
    def _beyond_backfill(state: RoomState, msg: Json) -> bool:
        """A message past the recovered range while recovered messages still come."""
        end = state.backfill_to
        if end is None:
            return False
        at = position_of(msg)
        return at is not None and at.epoch == end.epoch and at.offset > end.offset

    @staticmethod
    def _backfill_done(state: RoomState) -> bool:
        position, end = state.position, state.backfill_to
        return (position is None or end is None or position.epoch != end.epoch
                or position.offset >= end.offset)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
