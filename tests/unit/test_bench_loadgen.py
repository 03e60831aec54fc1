"""The load generator's pure checks: a recovery is judged right, members split evenly."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("picows")

from bench.loadgen import recovery_problem, split


def joined(count: int, after: int = 0, **changes: Any) -> dict[str, Any]:
    messages = [
        {"type": "message", "room": "r", "offset": after + n + 1, "epoch": "e", "data": {"seq": n}}
        for n in range(count)
    ]
    return {"type": "joined", "room": "r", "recovered": True, "messages": messages, **changes}


def test_a_complete_recovery_in_order_passes() -> None:
    assert recovery_problem(joined(300), "r", 0, 300) is None
    assert recovery_problem(joined(5, after=7), "r", 7, 5) is None


def test_a_short_unordered_or_refused_recovery_is_reported() -> None:
    assert recovery_problem(joined(299), "r", 0, 300) == {"expected": 300, "recovered_count": 299}
    swapped = joined(3)
    swapped["messages"][1], swapped["messages"][2] = swapped["messages"][2], swapped["messages"][1]
    assert recovery_problem(swapped, "r", 0, 3)["at"] == 1
    assert recovery_problem(joined(3, recovered=False, messages=[]), "r", 0, 3) is not None
    assert recovery_problem(joined(3), "other", 0, 3) is not None


def test_split_spreads_members_evenly() -> None:
    assert split(1000, 2) == [500, 500]
    assert split(51, 2) == [26, 25]
    assert split(7, 1) == [7]
