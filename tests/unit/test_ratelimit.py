"""TokenBucket and BucketTable with a fake clock: no waiting."""

import pytest

from wsserver.ratelimit import BucketTable, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_burst_then_refuses_with_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.1)
    clock.now += 0.05
    assert bucket.take() == pytest.approx(0.05)
    clock.now += 0.05
    assert bucket.take() == 0.0


def test_refused_take_spends_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    assert bucket.take() == 0.0
    for _ in range(5):
        assert bucket.take() > 0
    clock.now += 1.0
    assert bucket.take() == 0.0


def test_bucket_never_exceeds_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100, burst=2, clock=clock)
    clock.now += 3600
    assert [bucket.take() == 0.0 for _ in range(3)] == [True, True, False]


def test_clock_going_backwards_does_not_mint_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    bucket.take()
    clock.now -= 100
    assert bucket.take() > 0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_invalid_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_table_keys_are_independent() -> None:
    clock = FakeClock()
    table: BucketTable[str] = BucketTable(rate=1, burst=1, clock=clock)
    assert table.take("alice") == 0.0
    assert table.take("alice") > 0
    assert table.take("bob") == 0.0


def test_discard_keeps_a_refilling_bucket_so_reconnecting_does_not_reset_it() -> None:
    clock = FakeClock()
    table: BucketTable[str] = BucketTable(rate=1, burst=2, clock=clock)
    table.take("alice")
    table.take("alice")
    table.discard("alice")
    assert "alice" in table
    assert table.take("alice") > 0
    clock.now += 2
    table.discard("alice")
    assert "alice" not in table


def test_sweep_bounds_memory_to_active_keys() -> None:
    clock = FakeClock()
    table: BucketTable[int] = BucketTable(rate=10, burst=1, clock=clock)
    for key in range(10_000):
        table.take(key)
    assert len(table) == 10_000
    clock.now += 0.1
    assert table.sweep() == 10_000
    assert len(table) == 0
