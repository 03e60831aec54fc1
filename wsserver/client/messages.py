"""What a room delivers to the application: messages, and the gaps it must know about."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

#: A decoded JSON object as the server sends it.
Json = dict[str, Any]

GapKind = Literal["gap", "recovery_failed", "hole"]


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client is in a room with history: the last message it delivered."""

    epoch: str
    offset: int

    def as_since(self) -> Json:
        """The ``since`` field of a ``join`` that resumes from here."""
        return {"offset": self.offset, "epoch": self.epoch}


@dataclass(frozen=True, slots=True, eq=False)
class Message:
    """A ``message`` of a room.

    Attributes:
        room: the room.
        data: what was published (any JSON value).
        sender: the publisher's ``sub``, None for the server API.
        offset, epoch: its place in a room with history (None without history).
        raw: the server's message as received.
        duplicate: only in the answer to a publish with an ``idempotency_key``
            used before: it was not published again (``raw`` is the server's
            ``published`` reply, ``offset``/``epoch`` the first publish's).
    """

    room: str
    data: Any
    sender: str | None
    offset: int | None = None
    epoch: str | None = None
    raw: Json = field(default_factory=dict, repr=False)
    duplicate: bool = False

    @classmethod
    def from_json(cls, msg: Json) -> Message:
        offset = msg.get("offset")
        epoch = msg.get("epoch")
        sender = msg.get("from")
        return cls(
            room=str(msg.get("room")),
            data=msg.get("data"),
            sender=sender if isinstance(sender, str) else None,
            offset=offset if _is_int(offset) else None,
            epoch=epoch if isinstance(epoch, str) else None,
            raw=msg,
            duplicate=msg.get("duplicate") is True,
        )


@dataclass(frozen=True, slots=True, eq=False)
class Gap:
    """Messages of a room were lost to this client: reload the room's state.

    Delivered in the room's stream at the place of the loss, and passed to
    the ``on_gap`` / ``on_recovery_failed`` callbacks.

    Attributes:
        room: the room.
        kind: ``"gap"`` (the server said so: ``{"type": "gap", ...}``),
            ``"recovery_failed"`` (a re-join answered ``recovered: false``) or
            ``"hole"`` (the client saw an offset jump the server did not report).
        epoch, offset: messages of that epoch up to this offset may be missing
            (None in rooms without history).
        dropped: how many messages were skipped, in rooms without history.
        raw: the server message that told (the ``gap``, or the ``joined``
            reply), or the message after the hole.
    """

    room: str
    kind: GapKind
    epoch: str | None = None
    offset: int | None = None
    dropped: int | None = None
    raw: Json = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class Presence:
    """Who is in a room, on every node."""

    room: str
    users: list[str]
    connections: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class History:
    """A room's kept messages, from ``GET /api/history``.

    Attributes:
        epoch, offset: the room's epoch and its top offset.
        complete: nothing after the asked offset is missing.
        messages: the messages, in offset order.
    """

    epoch: str
    offset: int
    complete: bool
    messages: list[Message]
