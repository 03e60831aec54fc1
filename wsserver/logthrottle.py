"""LogThrottle: at most a few log lines per key and interval, the rest counted.

Refused handshakes are cheap to send by the thousand; one log line each would
write past journald's burst limit and hide everything else. The metrics still
count every refusal; the log gets the first few per address and interval, then
one "N more ... suppressed" line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: The key that stands for every key once ``max_keys`` are tracked.
OVERFLOW = "*"


@dataclass
class _Window:
    start: float
    logged: int = 1
    suppressed: int = 0


class LogThrottle(Generic[K]):
    """Allows ``burst`` lines per key in each ``interval`` seconds.

    Args:
        burst: lines allowed per key and interval.
        interval: seconds of one window.
        max_keys: keys tracked at once; past it, new keys share one window
            (:data:`OVERFLOW`), so memory stays bounded under a spoofed flood.
        clock: monotonic seconds (injected by tests).
    """

    def __init__(
        self,
        burst: int = 10,
        interval: float = 60.0,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or not interval > 0:
            raise ValueError("burst must be at least 1 and interval above 0")
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[K | str, _Window] = {}

    def allow(self, key: K) -> tuple[bool, int]:
        """Whether to log a line for ``key`` now, and how many lines of its
        previous window were suppressed (to report them first)."""
        now = self._clock()
        slot: K | str = key
        if key not in self._windows and len(self._windows) >= self.max_keys:
            slot = OVERFLOW
        window = self._windows.get(slot)
        if window is None or now - window.start >= self.interval:
            earlier = window.suppressed if window is not None else 0
            self._windows[slot] = _Window(now)
            return True, earlier
        if window.logged < self.burst:
            window.logged += 1
            return True, 0
        window.suppressed += 1
        return False, 0

    def sweep(self) -> list[tuple[K | str, int]]:
        """Forget windows that have ended; the keys among them that had lines
        suppressed, with how many (for a periodic summary line)."""
        now = self._clock()
        ended = [key for key, w in self._windows.items() if now - w.start >= self.interval]
        report = []
        for key in ended:
            window = self._windows.pop(key)
            if window.suppressed:
                report.append((key, window.suppressed))
        return report

    def __len__(self) -> int:
        return len(self._windows)
