"""wsserver.client's pure decisions: the same table as static/wsclient.js, in seconds.

Mirrors tests/js/wsclient.test.mjs: backoff with full jitter, what each close
code and each refused handshake means, the token margin, and which room
messages to deliver (repeats dropped, holes reported, partial recoveries).
"""

from __future__ import annotations

from typing import Any

import pytest

from wsserver.client.decisions import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    SOON_WINDOW,
    STABLE,
    TOKEN_MARGIN,
    CloseDecision,
    SendPacer,
    accept_message,
    attempt_after_close,
    backoff_delay,
    close_decision,
    describe_close,
    gap_outcome,
    handshake_decision,
    join_message,
    joined_outcome,
    reconnect_delay,
    token_usable,
)
from wsserver.client.messages import Position
from wsserver.closecodes import CloseCode


def just_below_one() -> float:
    return 1 - 2**-52


@pytest.mark.parametrize(("attempt", "window"), [
    (0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 20.0), (7, 20.0), (50, 20.0),
])
def test_backoff_window_doubles_from_half_a_second_and_stops_at_20(
    attempt: int, window: float
) -> None:
    assert backoff_delay(attempt, just_below_one) == pytest.approx(window)
    assert (BACKOFF_BASE, BACKOFF_CAP) == (0.5, 20.0)


def test_backoff_uses_full_jitter_down_to_zero() -> None:
    assert backoff_delay(5, lambda: 0.0) == 0.0
    assert backoff_delay(5, lambda: 0.5) == 8.0
    assert backoff_delay(3, lambda: 0.25) == 1.0


def test_backoff_treats_a_negative_attempt_as_the_first_and_never_overflows() -> None:
    assert backoff_delay(-3, lambda: 0.5) == 0.25
    assert backoff_delay(10_000, lambda: 0.5) == 10.0


def test_soon_reconnects_wait_under_a_second_whatever_the_attempt() -> None:
    assert SOON_WINDOW == 1.0
    assert reconnect_delay("soon", 9, lambda: 0.5) == 0.5
    assert reconnect_delay("backoff", 2, lambda: 0.5) == 1.0


def test_a_retry_after_from_the_server_is_a_floor() -> None:
    assert reconnect_delay("backoff", 0, lambda: 0.5, retry_after=3.0) == 3.0
    assert reconnect_delay("backoff", 5, lambda: 0.5, retry_after=3.0) == 8.0


RECONNECT_SOON = CloseDecision("reconnect", "soon")
BACK_OFF = CloseDecision("reconnect", "backoff")
STOP = CloseDecision("stop")

# docs/protocol.md "Close codes", and 1012 "service restart" (a paced drain; the
# contract says "reconnect with backoff").
CLOSE_TABLE: list[tuple[int | None, CloseDecision]] = [
    (1000, STOP),
    (1001, RECONNECT_SOON),
    (1002, STOP),
    (1006, BACK_OFF),
    (None, BACK_OFF),
    (1007, STOP),
    (1008, STOP),
    (1009, STOP),
    (1011, BACK_OFF),
    (1012, BACK_OFF),  # a paced drain: the first try is within 0.5 s after a stable connection
    (4001, CloseDecision("reconnect", "soon", new_token=True)),
    (4003, STOP),
    (4008, BACK_OFF),
    (4009, BACK_OFF),
    (4029, BACK_OFF),
    (4999, BACK_OFF),
]


@pytest.mark.parametrize(("code", "expected"), CLOSE_TABLE)
def test_close_code_decision(code: int | None, expected: CloseDecision) -> None:
    assert close_decision(code) == expected


def test_the_table_agrees_with_the_server_and_the_browser_client() -> None:
    """Every code of wsserver/closecodes.py is in the table above with the
    decision its ``reconnect`` column implies (wsclient.js uses the same column)."""
    implied = {"never": STOP, "fix_client": STOP, "backoff": BACK_OFF, "soon": RECONNECT_SOON,
               "new_token": CloseDecision("reconnect", "soon", new_token=True)}
    table = dict(CLOSE_TABLE)
    assert {int(code): implied[code.reconnect] for code in CloseCode} == {
        int(code): table[int(code)] for code in CloseCode
    }


def test_a_second_4001_in_a_row_backs_off() -> None:
    assert close_decision(4001, previous_code=4001) == CloseDecision("reconnect", "backoff", True)
    assert close_decision(4001, previous_code=1006) == CloseDecision("reconnect", "soon", True)


def test_a_close_the_user_asked_for_stops_whatever_the_code() -> None:
    for code, _ in CLOSE_TABLE:
        assert close_decision(code, user_closed=True) == STOP


@pytest.mark.parametrize(("status", "expected"), [
    (None, BACK_OFF),  # connection refused: a node restarting
    (429, BACK_OFF),  # handshake rate, or the address cap
    (503, BACK_OFF),  # server full, draining
    (502, BACK_OFF),  # a proxy in front with no node behind it
    (401, CloseDecision("reconnect", "backoff", new_token=True)),
    (403, STOP),  # origin not allowed, or no token: the same request fails again
    (400, STOP),
    (404, STOP),
])
def test_refused_handshake_decision(status: int | None, expected: CloseDecision) -> None:
    assert handshake_decision(status) == expected


def test_backoff_restarts_only_after_a_connection_that_stayed_up() -> None:
    assert attempt_after_close(6, None) == 6
    assert attempt_after_close(6, 0.05) == 6
    assert attempt_after_close(6, STABLE - 0.001) == 6
    assert attempt_after_close(6, STABLE) == 0


def test_a_token_about_to_expire_is_not_used_for_a_new_connection() -> None:
    now = 1_000_000_000.0
    assert token_usable(None, now)
    assert token_usable(now + 60, now)
    assert token_usable(now + TOKEN_MARGIN + 1, now)
    assert not token_usable(now + TOKEN_MARGIN, now)
    assert not token_usable(now - 1, now)


def test_every_close_code_has_words() -> None:
    assert describe_close(1006) == "connection lost"
    assert describe_close(None) == "connection lost"
    assert describe_close(1012).startswith("service restart")
    assert describe_close(4003) == CloseCode.FORBIDDEN.meaning
    assert describe_close(4999) == "closed (4999)"


# --- resuming rooms with history ------------------------------------------------------


def msg_at(offset: int, epoch: str = "e1", room: str = "chat:1") -> dict[str, Any]:
    return {"type": "message", "room": room, "from": "bob", "data": f"m{offset}",
            "offset": offset, "epoch": epoch}


def test_a_join_asks_for_what_was_missed_only_when_a_position_is_known() -> None:
    assert join_message("lobby", None) == {"type": "join", "room": "lobby"}
    assert join_message("chat:1", Position("e1", 7)) == {
        "type": "join", "room": "chat:1", "since": {"offset": 7, "epoch": "e1"}}


@pytest.mark.parametrize(("position", "msg", "deliver", "after", "hole"), [
    # rooms without history: always delivered, no position
    (None, {"type": "message", "room": "r", "data": 1}, True, None, False),
    # the first message seen sets the position
    (None, msg_at(5), True, Position("e1", 5), False),
    # the next one
    (Position("e1", 5), msg_at(6), True, Position("e1", 6), False),
    # a repeat (recovered, then live again): dropped, the position stays
    (Position("e1", 6), msg_at(6), False, Position("e1", 6), False),
    (Position("e1", 6), msg_at(2), False, Position("e1", 6), False),
    # a jump with no gap before it: delivered, and reported
    (Position("e1", 6), msg_at(9), True, Position("e1", 9), True),
    # another epoch with no gap before it: the history was lost
    (Position("e1", 6), msg_at(1, "e2"), True, Position("e2", 1), True),
])
def test_accept_message(position: Position | None, msg: dict[str, Any], deliver: bool,
                        after: Position | None, hole: bool) -> None:
    verdict = accept_message(position, msg)
    assert (verdict.deliver, verdict.position, verdict.hole) == (deliver, after, hole)


def test_a_plain_join_takes_the_top_as_its_position() -> None:
    outcome = joined_outcome(None, {"type": "joined", "room": "chat:1", "epoch": "e1",
                                    "offset": 12}, asked=False)
    assert (outcome.position, outcome.messages, outcome.recovered) == (Position("e1", 12), [],
                                                                       None)


def test_a_join_in_a_room_without_history_has_no_position() -> None:
    outcome = joined_outcome(Position("e1", 3), {"type": "joined", "room": "lobby"}, asked=True)
    assert (outcome.position, outcome.recovered) == (None, None)


def test_a_recovered_join_delivers_in_order_without_repeats() -> None:
    reply = {"type": "joined", "room": "chat:1", "epoch": "e1", "offset": 9, "recovered": True,
             "messages": [msg_at(8), msg_at(6), msg_at(7), msg_at(9), msg_at(5)]}
    outcome = joined_outcome(Position("e1", 5), reply, asked=True)
    assert [m["offset"] for m in outcome.messages] == [6, 7, 8, 9]
    assert (outcome.position, outcome.recovered, outcome.pending) == (Position("e1", 9), True, 0)


def test_a_recovery_never_moves_the_position_back() -> None:
    reply = {"type": "joined", "room": "chat:1", "epoch": "e1", "offset": 4, "recovered": True,
             "messages": []}
    assert joined_outcome(Position("e1", 7), reply, asked=True).position == Position("e1", 7)


def test_a_failed_recovery_jumps_to_the_top_and_says_so() -> None:
    reply = {"type": "joined", "room": "chat:1", "epoch": "e2", "offset": 3, "recovered": False,
             "messages": []}
    outcome = joined_outcome(Position("e1", 40), reply, asked=True)
    assert (outcome.position, outcome.messages, outcome.recovered) == (Position("e2", 3), [],
                                                                       False)


def test_a_partial_recovery_waits_for_the_pending_messages_by_offset() -> None:
    # Missed 6..20: 6..10 in the reply, 11..20 follow as ordinary messages.
    reply = {"type": "joined", "room": "chat:1", "epoch": "e1", "offset": 20, "recovered": True,
             "messages": [msg_at(n) for n in range(6, 11)], "pending": 10}
    outcome = joined_outcome(Position("e1", 5), reply, asked=True)
    assert [m["offset"] for m in outcome.messages] == [6, 7, 8, 9, 10]
    # The position stays at 10, so 11..20 are not taken for repeats of the top.
    assert (outcome.position, outcome.pending, outcome.backfill_to) == (Position("e1", 10), 10,
                                                                        20)
    assert accept_message(outcome.position, msg_at(11)).deliver


def test_a_partial_recovery_with_nothing_in_the_reply_starts_from_since() -> None:
    reply = {"type": "joined", "room": "chat:1", "epoch": "e1", "offset": 20, "recovered": True,
             "messages": [], "pending": 15}
    outcome = joined_outcome(Position("e1", 5), reply, asked=True)
    assert (outcome.position, outcome.backfill_to) == (Position("e1", 5), 20)


@pytest.mark.parametrize(("position", "gap", "after", "lost"), [
    (Position("e1", 4), {"epoch": "e1", "offset": 9}, Position("e1", 9), True),
    (Position("e1", 12), {"epoch": "e1", "offset": 9}, Position("e1", 12), False),
    (Position("e1", 9), {"epoch": "e1", "offset": 9}, Position("e1", 9), False),
    (Position("e1", 40), {"epoch": "e2", "offset": 3}, Position("e2", 3), True),
    (None, {"epoch": "e1", "offset": 9}, Position("e1", 9), True),
    # a room without history: how many were dropped, no position
    (None, {"dropped": 3}, None, True),
])
def test_gap_outcome(position: Position | None, gap: dict[str, Any], after: Position | None,
                     lost: bool) -> None:
    assert gap_outcome(position, {"type": "gap", "room": "chat:1", **gap}) == (after, lost)


# --- pacing to the user's message bucket ------------------------------------------------


def test_the_pacer_sends_a_burst_then_paces_below_the_rate() -> None:
    pacer = SendPacer(rate=10, burst=20)
    delays = [pacer.delay(100.0) for _ in range(20)]
    # The burst, less a reserve of two for arrival jitter, goes at once...
    assert delays[:18] == [0.0] * 18
    # ...then one message per 1/9 s (10 % under the rate), reserved in order.
    assert delays[18] == pytest.approx(1 / 9)
    assert delays[19] == pytest.approx(2 / 9)


def test_the_pacer_refills_with_time_up_to_its_burst() -> None:
    pacer = SendPacer(rate=10, burst=5)
    assert [pacer.delay(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pacer.delay(1000.0) == 0.0
    assert [pacer.delay(1000.0) for _ in range(2)] == [0.0, 0.0]
    assert pacer.delay(1000.0) > 0


def test_the_pacer_waits_out_a_rate_limited_answer() -> None:
    pacer = SendPacer(rate=10, burst=20)
    pacer.penalize(2.0, now=50.0)
    assert pacer.delay(50.0) == pytest.approx(2.0 + 1 / 9)


def test_without_a_welcome_there_is_nothing_to_pace_to() -> None:
    assert [SendPacer().delay(0.0) for _ in range(100)] == [0.0] * 100


def test_a_new_welcome_does_not_refill_the_bucket() -> None:
    """The server keeps a user's bucket across reconnects; so does the pacer."""
    pacer = SendPacer(rate=10, burst=5)
    for _ in range(3):
        pacer.delay(0.0)
    pacer.configure(10, 5)
    assert pacer.delay(0.0) > 0
