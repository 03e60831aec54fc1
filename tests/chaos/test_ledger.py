"""The chaos suite's judge, judged: :mod:`tests.support.ledger` flags every way a
client can be let down, and nothing a careful client was told about.

Pure bookkeeping, no sockets: milliseconds.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from tests.support.ledger import Ack, Epochs, RoomLedger, judge, overreaching_gaps, spans

pytestmark = pytest.mark.chaos

ROOM = "chaos:r"


def clocked_epochs() -> Epochs:
    ticks = itertools.count()
    return Epochs(clock=lambda: float(next(ticks)))


def message(epoch: str, offset: int) -> dict[str, Any]:
    return {"type": "message", "room": ROOM, "from": None, "epoch": epoch, "offset": offset,
            "data": {"uid": f"{epoch}-{offset}"}}


def acks(epoch: str, first: int, last: int) -> list[Ack]:
    return [Ack(ROOM, epoch, n, f"{epoch}-{n}") for n in range(first, last + 1)]


def ledger_at(epoch: str, offset: int) -> RoomLedger:
    ledger = RoomLedger("c00", ROOM, clocked_epochs())
    ledger.on_joined({"type": "joined", "room": ROOM, "epoch": epoch, "offset": offset},
                     with_since=False, conn=1)
    return ledger


def kinds(found: list[Any]) -> list[str]:
    return sorted(v.kind for v in found)


def test_every_message_once_in_order_is_clean() -> None:
    ledger = ledger_at("A", 3)
    for n in range(4, 11):
        ledger.on_message(message("A", n), conn=1)
    published = acks("A", 1, 10)
    assert ledger.violations == []
    assert judge(ledger, published, published[-1]) == []
    assert ledger.position == ("A", 10)


def test_a_silent_hole_is_flagged_on_arrival_and_as_lost() -> None:
    ledger = ledger_at("A", 0)
    for n in (1, 2, 5, 6):
        ledger.on_message(message("A", n), conn=1)
    published = acks("A", 1, 6)
    assert [v.kind for v in ledger.violations] == ["silent-hole"]
    assert "offsets 3-4 never arrived" in ledger.violations[0].detail
    lost = judge(ledger, published, published[-1])
    assert kinds(lost) == ["lost"]
    assert "offsets 3-4 (2)" in lost[0].detail


def test_a_message_never_delivered_at_the_end_is_lost() -> None:
    ledger = ledger_at("A", 0)
    ledger.on_message(message("A", 1), conn=1)
    published = acks("A", 1, 3)
    assert kinds(judge(ledger, published, published[-1])) == ["lost"]


def test_repeats_are_dropped_and_flagged() -> None:
    ledger = ledger_at("A", 0)
    for n in (1, 2, 2, 3):
        ledger.on_message(message("A", n), conn=1)
    ledger.on_message(message("A", 3), conn=2)
    assert [v.kind for v in ledger.violations] == ["repeat", "repeat"]
    assert "same connection" in ledger.violations[0].detail
    assert "after a re-join" in ledger.violations[1].detail
    assert ledger.repeats == 2
    published = acks("A", 1, 3)
    assert judge(ledger, published, published[-1]) == []


def test_a_gap_covers_what_it_says() -> None:
    ledger = ledger_at("A", 0)
    ledger.on_message(message("A", 1), conn=1)
    ledger.on_gap({"type": "gap", "room": ROOM, "epoch": "A", "offset": 4, "recovered": False})
    ledger.on_message(message("A", 5), conn=1)
    published = acks("A", 1, 5)
    assert ledger.violations == []
    assert judge(ledger, published, published[-1]) == []


def test_another_epoch_without_a_gap_is_flagged() -> None:
    ledger = ledger_at("A", 2)
    ledger.on_message(message("B", 1), conn=1)
    assert [v.kind for v in ledger.violations] == ["epoch-without-gap"]


def test_a_new_epoch_after_a_gap_covers_the_rest_of_the_old_one() -> None:
    epochs = clocked_epochs()
    published = acks("A", 1, 5)
    for ack in published:
        epochs.saw(ack.epoch)
    ledger = RoomLedger("c00", ROOM, epochs)
    ledger.on_joined({"type": "joined", "room": ROOM, "epoch": "A", "offset": 2},
                     with_since=False, conn=1)
    ledger.on_gap({"type": "gap", "room": ROOM, "epoch": "B", "offset": 0, "recovered": False})
    ledger.on_message(message("B", 1), conn=1)
    published += acks("B", 1, 1)
    assert ledger.violations == []
    assert judge(ledger, published, published[-1]) == []
    # ... and only that: B's messages are still in the history, none is covered.
    assert overreaching_gaps(ledger, acks("B", 1, 1)) == []


def test_a_gap_over_messages_still_in_the_history_overreaches() -> None:
    epochs = clocked_epochs()
    epochs.saw("A")
    ledger = RoomLedger("c00", ROOM, epochs)
    ledger.on_joined({"type": "joined", "room": ROOM, "epoch": "A", "offset": 2},
                     with_since=False, conn=1)
    ledger.on_gap({"type": "gap", "room": ROOM, "epoch": "B", "offset": 3, "recovered": False})
    ledger.on_message(message("B", 4), conn=1)
    found = overreaching_gaps(ledger, acks("B", 1, 4))
    assert kinds(found) == ["gap-overreach"]
    assert "covered offsets 1-3 of epoch B" in found[0].detail


def test_recovery_with_since_delivers_in_order_whatever_its_shape() -> None:
    ledger = ledger_at("A", 0)
    ledger.on_message(message("A", 1), conn=1)
    # Reconnected: part of the missed messages in the answer, the rest after it.
    ledger.on_joined({"type": "joined", "room": ROOM, "epoch": "A", "offset": 6,
                      "recovered": True, "messages": [message("A", 2), message("A", 3)],
                      "pending": 3}, with_since=True, conn=2)
    for n in (4, 5, 6, 7):
        ledger.on_message(message("A", n), conn=2)
    published = acks("A", 1, 7)
    assert ledger.violations == []
    assert judge(ledger, published, published[-1]) == []


def test_recovered_false_is_a_told_range() -> None:
    ledger = ledger_at("A", 0)
    ledger.on_message(message("A", 1), conn=1)
    ledger.on_joined({"type": "joined", "room": ROOM, "epoch": "A", "offset": 9,
                      "recovered": False, "messages": []}, with_since=True, conn=2)
    ledger.on_message(message("A", 10), conn=2)
    published = acks("A", 1, 10)
    assert ledger.violations == []
    assert judge(ledger, published, published[-1]) == []
    # A gap is judged stricter than a refused recovery: this is not one.
    assert overreaching_gaps(ledger, published) == []


def test_a_join_with_since_answered_without_recovered_is_flagged() -> None:
    ledger = ledger_at("A", 0)
    ledger.on_joined({"type": "joined", "room": ROOM, "epoch": "A", "offset": 9},
                     with_since=True, conn=2)
    assert [v.kind for v in ledger.violations] == ["bad-joined"]
    assert ledger.position == ("A", 0)  # not taken as told


def test_a_re_join_without_since_is_the_clients_own_choice() -> None:
    ledger = ledger_at("A", 0)
    ledger.on_message(message("A", 1), conn=1)
    ledger.on_joined({"type": "joined", "room": ROOM, "epoch": "A", "offset": 5},
                     with_since=False, conn=1)
    ledger.on_message(message("A", 6), conn=1)
    published = acks("A", 1, 6)
    assert judge(ledger, published, published[-1]) == []


def test_what_came_before_the_first_join_is_not_owed() -> None:
    ledger = ledger_at("A", 7)
    ledger.on_message(message("A", 8), conn=1)
    published = acks("A", 1, 8)
    assert judge(ledger, published, published[-1]) == []
    assert kinds(judge(RoomLedger("c01", ROOM, clocked_epochs()), published,
                       published[-1])) == ["never-joined"]


def test_a_delivery_with_other_data_than_acknowledged_is_flagged() -> None:
    ledger = ledger_at("A", 0)
    ledger.on_message(message("A", 1), conn=1)
    wrong = [Ack(ROOM, "A", 1, "someone-else")]
    assert kinds(judge(ledger, wrong, wrong[-1])) == ["wrong-data"]


def test_epochs_rank_by_first_sighting() -> None:
    epochs = clocked_epochs()
    for epoch in ("old", "new", "old", "newest"):
        epochs.saw(epoch)
    assert [epochs.rank(e) for e in ("old", "new", "newest")] == [0, 1, 2]
    assert epochs.key(("old", 500)) < epochs.key(("new", 1))


def test_spans() -> None:
    assert spans([7, 1, 2, 3, 9, 10]) == "1-3, 7, 9-10"
    assert spans([]) == ""
