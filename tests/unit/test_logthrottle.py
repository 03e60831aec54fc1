"""LogThrottle with an injected clock: a burst per key and interval, the rest counted."""

from wsserver.logthrottle import OVERFLOW, LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_per_key_then_suppressed_then_reported() -> None:
    clock = Clock()
    throttle: LogThrottle[str] = LogThrottle(3, 10.0, clock=clock)
    assert [throttle.allow("a") for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    assert throttle.allow("b") == (True, 0)  # another key has its own window
    clock.now += 9.9
    assert throttle.allow("a") == (False, 0)
    clock.now += 0.1
    # A new window: the line is logged, and the 3 suppressed ones are reported.
    assert throttle.allow("a") == (True, 3)
    assert throttle.allow("a") == (True, 0)


def test_sweep_reports_ended_windows_and_forgets_them() -> None:
    clock = Clock()
    throttle: LogThrottle[str] = LogThrottle(1, 5.0, clock=clock)
    for _ in range(4):
        throttle.allow("a")
    throttle.allow("b")
    assert throttle.sweep() == []  # nothing ended yet
    clock.now += 5
    assert throttle.sweep() == [("a", 3)]
    assert len(throttle) == 0
    assert throttle.allow("a") == (True, 0)  # already reported: not again


def test_keys_past_the_bound_share_one_window() -> None:
    clock = Clock()
    throttle: LogThrottle[str] = LogThrottle(2, 5.0, max_keys=2, clock=clock)
    throttle.allow("a")
    throttle.allow("b")
    results = [throttle.allow(f"spoofed{n}") for n in range(5)]
    assert results == [(True, 0), (True, 0), (False, 0), (False, 0), (False, 0)]
    assert len(throttle) == 3
    clock.now += 5
    assert throttle.sweep() == [(OVERFLOW, 3)]
