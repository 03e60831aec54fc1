"""The client's decisions as pure functions: no socket, no clock, no event loop.

The same decisions as ``static/wsclient.js`` (the browser client), in seconds
instead of milliseconds: exponential backoff with full jitter, what each close
code means, when a token is worth a handshake, and which room messages to
deliver after a reconnect. :mod:`wsserver.client.machine` applies them to one
connection's traffic; ``tests/unit/test_client_decisions.py`` tables them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from wsserver.client.messages import Json, Position
from wsserver.closecodes import BACKOFF, FIX_CLIENT, NEVER, NEW_TOKEN, SOON, CloseCode

#: The first reconnect waits up to this long (s); the window doubles each attempt.
BACKOFF_BASE = 0.5
#: The backoff window never grows past this (s).
BACKOFF_CAP = 20.0
#: After 1001 (server going away) reconnect within this window (s).
SOON_WINDOW = 1.0
#: A connection open at least this long (s) resets the backoff.
STABLE = 10.0
#: A token expiring within this margin (s) is not used for a new connection.
TOKEN_MARGIN = 5.0

#: What the client does after each close code: the server's own table
#: (:mod:`wsserver.closecodes`), and 1012 "service restart", which the server
#: sends a few connections at a time when it drains on SIGTERM: reconnect with
#: backoff, as the contract says. After a connection that was up a while the
#: backoff starts over, so the first try comes within half a second, spread
#: by the full jitter; if the node is not back yet, the tries slow down. When
#: the server's table lists 1012 itself, its entry wins.
CLOSE_ACTIONS: dict[int, str] = {
    1012: BACKOFF, **{int(code): code.reconnect for code in CloseCode}
}

Delay = Literal["soon", "backoff"]


@dataclass(frozen=True, slots=True)
class CloseDecision:
    """What to do after a connection ended.

    Attributes:
        action: ``"stop"`` (retrying cannot help) or ``"reconnect"``.
        delay: for a reconnect, ``"soon"`` (within a second) or ``"backoff"``.
        new_token: get a new token before the next handshake.
    """

    action: Literal["stop", "reconnect"]
    delay: Delay | None = None
    new_token: bool = False


STOP = CloseDecision("stop")


def backoff_delay(attempt: int, random: Callable[[], float],
                  base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Delay before reconnect attempt ``attempt`` (0 for the first): uniform in
    [0, min(cap, base * 2**attempt)). Full jitter spreads a crowd of clients
    that lost the same server, so they do not come back in step."""
    exponent = min(max(0, attempt), 30)  # 2**30 * base already exceeds any cap
    return float(random() * min(cap, base * 2.0**exponent))


def close_decision(code: int | None, *, user_closed: bool = False,
                   previous_code: int | None = None) -> CloseDecision:
    """What to do when the connection closed with ``code``.

    None and 1006 (no close frame: the network or the server went away) and
    codes outside the table back off. ``previous_code`` is the code of the
    close before, when the connection in between never got its welcome: a
    second 4001 in a row means the new token failed too, so back off.
    """
    if user_closed:
        return STOP
    action = CLOSE_ACTIONS.get(code, BACKOFF) if code is not None else BACKOFF
    if action in (NEVER, FIX_CLIENT):
        return STOP
    if action == NEW_TOKEN:
        return CloseDecision("reconnect", "backoff" if previous_code == code else "soon", True)
    if action == SOON:
        return CloseDecision("reconnect", "soon")
    return CloseDecision("reconnect", "backoff")


def handshake_decision(status: int | None) -> CloseDecision:
    """What to do when the upgrade was refused with HTTP ``status`` (None: no
    answer at all, e.g. connection refused while a node restarts).

    429 and 503 (handshake rate, server full, draining) and other 5xx back off;
    401 gets a new token; any other 4xx (403 origin or no token, 400, 404)
    would be refused again: stop.
    """
    if status is None or status == 429 or status >= 500:
        return CloseDecision("reconnect", "backoff")
    if status == 401:
        return CloseDecision("reconnect", "backoff", True)
    return STOP


def reconnect_delay(kind: Delay, attempt: int, random: Callable[[], float],
                    retry_after: float | None = None) -> float:
    """Seconds before a reconnect of ``kind`` at backoff ``attempt``; never
    sooner than a ``Retry-After`` the server gave."""
    delay = random() * SOON_WINDOW if kind == "soon" else backoff_delay(attempt, random)
    return max(delay, retry_after or 0.0)


def attempt_after_close(attempt: int, open_for: float | None, stable: float = STABLE) -> int:
    """The backoff attempt number after a close: back to 0 when the connection
    had been up for ``stable`` seconds, so a server that accepts and then drops
    at once (4029, 4009...) still sees the client back off further each time."""
    return 0 if open_for is not None and open_for >= stable else attempt


def token_usable(expires_at: float | None, now: float, margin: float = TOKEN_MARGIN) -> bool:
    """Whether a token expiring at ``expires_at`` (unix seconds, None when
    unknown) is worth a handshake at ``now``: not when the server would close
    with 4001 at once."""
    return expires_at is None or expires_at - now > margin


def join_message(room: str, position: Position | None) -> Json:
    """The ``join`` of ``room``, asking for what was missed when ``position`` is known."""
    if position is None:
        return {"type": "join", "room": room}
    return {"type": "join", "room": room, "since": position.as_since()}


def position_of(msg: Json) -> Position | None:
    """The (epoch, offset) a message or reply carries, None without history."""
    epoch, offset = msg.get("epoch"), msg.get("offset")
    if isinstance(epoch, str) and isinstance(offset, int) and not isinstance(offset, bool):
        return Position(epoch, offset)
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether to deliver a ``message``, the room's position after it, and
    whether messages before it went missing without a ``gap`` saying so."""

    deliver: bool
    position: Position | None
    hole: bool = False


def accept_message(position: Position | None, msg: Json) -> Verdict:
    """Judge a room ``message`` against the room's last ``position``.

    A message without an offset (room without history) is always delivered;
    one at or below the position in the same epoch is a repeat and dropped.
    One further than the next offset, or of another epoch with no ``gap``
    before it, is delivered and marks a hole: the server promised to say when
    messages are lost, so a silent jump is reported rather than passed over.
    """
    at = position_of(msg)
    if at is None:
        return Verdict(True, position)
    if position is None:
        return Verdict(True, at)
    if at.epoch == position.epoch:
        if at.offset <= position.offset:
            return Verdict(False, position)
        return Verdict(True, at, hole=at.offset > position.offset + 1)
    return Verdict(True, at, hole=True)


@dataclass(frozen=True, slots=True)
class JoinedOutcome:
    """What a ``joined`` reply means.

    Attributes:
        position: the room's position after the messages in the reply.
        messages: recovered messages still to deliver, in order, no repeats.
        recovered: True or False when the join asked (``since``), else None
            (also for rooms without history).
        pending: how many more recovered messages follow as ordinary frames.
        backfill_to: the offset those pending messages reach (None if none).
    """

    position: Position | None
    messages: list[Json]
    recovered: bool | None
    pending: int = 0
    backfill_to: int | None = None


def joined_outcome(position: Position | None, reply: Json, asked: bool) -> JoinedOutcome:
    """Judge a ``joined`` reply given the position held before the join and
    whether the join asked to recover (``asked``).

    ``recovered: true`` may come with only part of the missed messages and
    ``"pending": N``: the other N follow as ordinary ``message`` frames, in
    offset order, before any live one. The position then stays at the last
    message in hand (so those N are not taken for repeats).
    """
    top = position_of(reply)
    if top is None:
        return JoinedOutcome(None, [], None)  # no history in this room
    if not asked:
        return JoinedOutcome(top, [], None)
    if reply.get("recovered") is not True:
        return JoinedOutcome(top, [], False)
    current = position
    messages: list[Json] = []
    given = reply.get("messages")
    for msg in sorted((m for m in given if isinstance(m, dict)) if isinstance(given, list)
                      else [], key=_offset_key):
        verdict = accept_message(current, msg)
        current = verdict.position
        if verdict.deliver:
            messages.append(msg)
    pending = reply.get("pending")
    if isinstance(pending, int) and not isinstance(pending, bool) and pending > 0:
        base = current if current is not None and current.epoch == top.epoch else None
        start = base.offset if base is not None else top.offset - pending
        return JoinedOutcome(Position(top.epoch, start), messages, True, pending, start + pending)
    # Never move back: everything up to the reply's top is in hand now.
    if current is None or current.epoch != top.epoch or current.offset < top.offset:
        current = top
    return JoinedOutcome(current, messages, True)


def gap_outcome(position: Position | None, gap: Json) -> tuple[Position | None, bool]:
    """Judge a ``gap`` message: (the room's position after it, whether anything
    was lost to this client). A gap at or below the position in the same epoch
    loses nothing; otherwise the position jumps to the gap's, so what follows
    is delivered. A gap of a room without history (``dropped``) always loses.
    """
    at = position_of(gap)
    if at is None:
        return position, True
    if position is not None and position.epoch == at.epoch and at.offset <= position.offset:
        return position, False
    return at, True


def _offset_key(msg: Json) -> int:
    offset = msg.get("offset")
    return offset if isinstance(offset, int) else 0


class SendPacer:
    """Paces the client's messages to the user's message bucket on the server.

    Every client message costs one token of the bucket the ``welcome`` describes
    (``message_rate`` per second, ``message_burst`` at most); a message sent
    with the bucket empty is dropped and answered ``rate_limited``. Pacing
    slows the caller instead. It keeps a margin (a little below the rate, a
    couple of tokens in reserve) because arrival times jitter, and it is not
    reset on reconnect, as the server's bucket is not.
    """

    RATE_MARGIN = 0.9
    RESERVE = 2.0

    def __init__(self, rate: float | None = None, burst: float | None = None) -> None:
        self.rate: float | None = None
        self.burst = 0.0
        self.tokens = 0.0
        self.last: float | None = None
        if rate is not None and burst is not None:
            self.configure(rate, burst)

    def configure(self, rate: float, burst: float) -> None:
        """Take the server's limits (from ``welcome``); the first call fills the bucket."""
        usable = max(1.0, burst - self.RESERVE)
        if self.rate is None:
            self.tokens = usable
        self.rate = max(rate * self.RATE_MARGIN, 1e-6)
        self.burst = usable
        self.tokens = min(self.tokens, usable)

    def delay(self, now: float) -> float:
        """Reserve one message at ``now``; the seconds to wait before sending it."""
        if self.rate is None:
            return 0.0  # no welcome yet: nothing known to pace to
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def penalize(self, retry_after: float, now: float) -> None:
        """The server answered ``rate_limited``: its bucket is empty for ``retry_after`` s."""
        if self.rate is None:
            return
        self.last = now
        self.tokens = min(self.tokens, -retry_after * self.rate)


def describe_close(code: int | None) -> str:
    """A close code's meaning for logs and errors ('closed (N)' when unknown)."""
    if code is None or code == 1006:
        return "connection lost"
    meanings = {1012: "service restart", **{int(c): c.meaning for c in CloseCode}}
    return meanings.get(code, f"closed ({code})")


def api_retryable(status: int | None) -> bool:
    """Whether an API request is worth sending again after ``status`` (None: no
    answer: connection refused or reset, timeout). 503 is the server's "broker
    unavailable, retry"; 502 and 504 come from a proxy in front of a node that
    is restarting. Anything else would be answered the same again."""
    return status is None or status in (502, 503, 504)
