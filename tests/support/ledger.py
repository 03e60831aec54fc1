"""What a careful client saw of each room, and the judgement of it against what was published.

Pure bookkeeping, no sockets: :class:`RoomLedger` takes the server's
``joined``, ``message``, ``gap`` and ``left`` for one client and one room of
the contract's "Round 3: what nothing lost silently means", in the order they
arrive, and keeps

* the client's position (epoch, offset), as a client keeps it to re-join with
  ``since``;
* every delivery (a message at position + 1 in the same epoch), and what went
  wrong on arrival: a silent hole, a repeat, another epoch without a ``gap``;
* every range the client was *told* about: a ``gap``, a ``recovered: false``,
  or a re-join without ``since`` (the client chose not to ask).

:func:`judge` then compares a ledger with the publisher's acknowledged
messages: every one after the client's first ``joined`` and up to the final
one is delivered exactly once, or lies inside a told range.

Positions of different epochs are ordered by :class:`Epochs`: an epoch ranks
by the first time anyone (publisher or client) saw it. Epochs follow one
another in time (a new one exists only once the old history is gone), so the
first sighting orders them, however late a straggler of an old one arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Position = tuple[str, int]


class Epochs:
    """Ranks epochs by the time they were first seen (by anyone in the test)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._first: dict[str, float] = {}

    def saw(self, epoch: str) -> None:
        self._first.setdefault(epoch, self._clock())

    def rank(self, epoch: str) -> int:
        order = sorted(self._first, key=self._first.__getitem__)
        return order.index(epoch)

    def key(self, position: Position) -> tuple[int, int]:
        """A sort key for a position: (the epoch's rank, the offset)."""
        return self.rank(position[0]), position[1]


@dataclass(frozen=True)
class Violation:
    """One broken promise, precise enough to say what broke: who, where, which
    offsets, and when it was seen (``time.monotonic()``, None when judged at the end)."""

    kind: str
    who: str
    room: str
    detail: str
    at: float | None = field(default_factory=time.monotonic, compare=False)

    def __str__(self) -> str:
        return f"[{self.kind}] {self.who} {self.room}: {self.detail}"

    def timed(self, start: float) -> str:
        """As text, with the time seen in seconds since ``start``."""
        return str(self) if self.at is None else f"{self} (t={self.at - start:+.2f} s)"


@dataclass(frozen=True)
class Told:
    """Positions in (start, end] that the client was told it would not get."""

    start: Position
    end: Position
    why: str
    at: float = field(default_factory=time.monotonic, compare=False)


@dataclass(frozen=True)
class Ack:
    """A message the server acknowledged (``POST /api/publish`` answered 200)."""

    room: str
    epoch: str
    offset: int
    uid: str


@dataclass
class RoomLedger:
    """One client's view of one room with history."""

    who: str
    room: str
    epochs: Epochs
    epoch: str | None = None
    offset: int = 0
    #: The answer to the client's first join: its membership starts there.
    first_joined: Position | None = None
    #: (epoch, offset) → the connection numbers it arrived on, and its data's ``uid``.
    deliveries: dict[Position, list[tuple[int, Any]]] = field(default_factory=dict)
    told: list[Told] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    #: Messages dropped as repeats (also recorded as violations).
    repeats: int = 0

    @property
    def position(self) -> Position | None:
        return None if self.epoch is None else (self.epoch, self.offset)

    def _violate(self, kind: str, detail: str) -> None:
        self.violations.append(Violation(kind, self.who, self.room, detail))

    def _tell(self, epoch: str, offset: int, why: str) -> None:
        """The client now stands at (epoch, offset); what lies between was told about."""
        self.epochs.saw(epoch)
        if self.epoch is not None and (epoch != self.epoch or offset > self.offset):
            self.told.append(Told((self.epoch, self.offset), (epoch, offset), why))
        if self.epoch is None or epoch != self.epoch or offset > self.offset:
            self.epoch, self.offset = epoch, offset

    def on_joined(self, reply: dict[str, Any], with_since: bool, conn: int) -> None:
        """A ``joined`` answer; its ``messages`` (recovered ones) are delivered in order."""
        epoch, top = reply.get("epoch"), reply.get("offset")
        if not isinstance(epoch, str) or not isinstance(top, int):
            self._violate("bad-joined", f"a room with history answered {reply!r}")
            return
        self.epochs.saw(epoch)
        if self.first_joined is None:
            self.first_joined = (epoch, top)
            self.epoch, self.offset = epoch, top
            return
        if not with_since:
            self._tell(epoch, top, "re-joined without since")
            return
        messages = reply.get("messages", [])
        if "recovered" not in reply:
            self._violate("bad-joined", f"a join with since answered without 'recovered': "
                          f"{reply!r:.200}")
            return
        if reply.get("recovered") is True:
            if epoch != self.epoch:
                self._violate("bad-joined", f"recovered: true into epoch {epoch} from "
                              f"{self.position}")
            for message in messages:
                self.on_message(message, conn)
            return
        if messages:
            self._violate("bad-joined", f"recovered: false with {len(messages)} messages")
        self._tell(epoch, top, "recovered: false")

    def on_message(self, message: dict[str, Any], conn: int) -> None:
        """A ``message``: delivered when it is the next offset of the same epoch."""
        epoch, offset = message.get("epoch"), message.get("offset")
        uid = message.get("data", {}).get("uid") if isinstance(message.get("data"), dict) else None
        if not isinstance(epoch, str) or not isinstance(offset, int):
            self._violate("no-offset", f"message without epoch/offset: {str(message)[:120]}")
            return
        self.epochs.saw(epoch)
        if self.epoch is None:
            self._violate("before-joined", f"message {epoch}/{offset} before any joined answer")
            return
        if epoch == self.epoch and offset <= self.offset:
            self.repeats += 1
            earlier = self.deliveries.get((epoch, offset), [])
            where = ("on the same connection" if any(c == conn for c, _ in earlier)
                     else "after a re-join" if earlier else "at or below a told position")
            self._violate("repeat", f"epoch {epoch} offset {offset} again ({where}; position "
                          f"{self.offset}, connection {conn})")
            return
        if epoch != self.epoch:
            self._violate("epoch-without-gap", f"message {epoch}/{offset} while at "
                          f"{self.epoch}/{self.offset}, no gap before it")
        elif offset > self.offset + 1:
            self._violate("silent-hole", f"epoch {epoch} offsets {_span(self.offset + 1, offset - 1)}"
                          f" never arrived, no gap (next was {offset}, connection {conn})")
        self.deliveries.setdefault((epoch, offset), []).append((conn, uid))
        self.epoch, self.offset = epoch, offset

    def on_gap(self, message: dict[str, Any]) -> None:
        """A ``gap``: the messages of its epoch up to its offset may be missing."""
        epoch, offset = message.get("epoch"), message.get("offset")
        if not isinstance(epoch, str) or not isinstance(offset, int):
            self._violate("bad-gap", f"a room with history sent {message!r}")
            return
        self._tell(epoch, offset, "gap")

    def reached(self, position: Position) -> bool:
        """At or past ``position`` (same epoch)."""
        return self.epoch == position[0] and self.offset >= position[1]


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def spans(offsets: Iterable[int]) -> str:
    """``1-3, 7, 9-10``: offsets as ranges."""
    ordered = sorted(offsets)
    parts: list[str] = []
    start = prev = None
    for offset in ordered:
        if start is None or prev is None:
            start = prev = offset
        elif offset == prev + 1:
            prev = offset
        else:
            parts.append(_span(start, prev))
            start = prev = offset
    if start is not None and prev is not None:
        parts.append(_span(start, prev))
    return ", ".join(parts)


def judge(ledger: RoomLedger, acked: Sequence[Ack], final: Ack) -> list[Violation]:
    """What ``ledger`` lacks: acknowledged messages after its first ``joined``, up to
    ``final``, neither delivered exactly once nor inside a range it was told about;
    and deliveries whose data is not the one acknowledged at that position."""
    found: list[Violation] = []
    if ledger.first_joined is None:
        return [Violation("never-joined", ledger.who, ledger.room, "no joined answer at all", None)]
    key = ledger.epochs.key
    start, end = key(ledger.first_joined), key((final.epoch, final.offset))
    told = [(key(t.start), key(t.end)) for t in ledger.told]
    missing: dict[str, list[int]] = {}
    twice: dict[str, list[int]] = {}
    for ack in acked:
        here = key((ack.epoch, ack.offset))
        if not start < here <= end:
            continue
        got = ledger.deliveries.get((ack.epoch, ack.offset), [])
        if len(got) > 1:
            twice.setdefault(ack.epoch, []).append(ack.offset)
        if got and got[0][1] != ack.uid:
            found.append(Violation("wrong-data", ledger.who, ledger.room,
                                   f"epoch {ack.epoch} offset {ack.offset} carried uid "
                                   f"{got[0][1]!r}, the publisher was told {ack.uid!r}", None))
        if not got and not any(lo < here <= hi for lo, hi in told):
            missing.setdefault(ack.epoch, []).append(ack.offset)
    for epoch, offsets in missing.items():
        found.append(Violation("lost", ledger.who, ledger.room,
                               f"epoch {epoch} offsets {spans(offsets)} ({len(offsets)}) "
                               f"acknowledged, never delivered, never told", None))
    for epoch, offsets in twice.items():
        found.append(Violation("delivered-twice", ledger.who, ledger.room,
                               f"epoch {epoch} offsets {spans(offsets)}", None))
    return found


def overreaching_gaps(ledger: RoomLedger, kept: Sequence[Ack]) -> list[Violation]:
    """``gap`` ranges that covered messages the history still held at the end
    (``kept``: the room's history read back; nothing was trimmed from it)."""
    key = ledger.epochs.key
    found: list[Violation] = []
    for told in ledger.told:
        if told.why != "gap":
            continue
        lo, hi = key(told.start), key(told.end)
        covered = [a.offset for a in kept if lo < key((a.epoch, a.offset)) <= hi
                   and (a.epoch, a.offset) not in ledger.deliveries]
        if covered:
            found.append(Violation(
                "gap-overreach", ledger.who, ledger.room,
                f"a gap from {told.start[0]}/{told.start[1]} to {told.end[0]}/{told.end[1]} "
                f"covered offsets {spans(covered)} of epoch {kept[0].epoch}, still in the history",
                told.at,
            ))
    return found
