"""The periodic connection check: an INFO line when the counts change, and a
WARNING near the cap."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("wsserver.monitor")

WARNING_RATIO = 0.9


@dataclass(frozen=True)
class Snapshot:
    """What the monitor saw in one check."""

    connections: int
    users: int
    rooms: int
    tasks_in_flight: int
    max_connections: int

    @property
    def near_cap(self) -> bool:
        """True at or above 90 % of ``--max-connections``."""
        return self.connections >= WARNING_RATIO * self.max_connections


class ConnectionMonitor:
    """Reads the counts through ``snapshot`` and logs them.

    At INFO only when a count differs from the last check's (an idle server
    writes its counts once, not every ``--monitor-interval``), at DEBUG
    otherwise; near the cap, a WARNING on every check.

    Args:
        snapshot: returns the current :class:`Snapshot`.
        housekeeping: called on every check (evicting idle rate-limit buckets).
    """

    def __init__(
        self, snapshot: Callable[[], Snapshot], housekeeping: Callable[[], None] | None = None
    ) -> None:
        self._snapshot = snapshot
        self._housekeeping = housekeeping
        self._last: Snapshot | None = None

    def check(self) -> Snapshot:
        """Log the counts once; return them."""
        snap = self._snapshot()
        if self._housekeeping is not None:
            self._housekeeping()
        percent = 100.0 * snap.connections / snap.max_connections
        if snap.near_cap:
            log.warning(
                "connections near the cap: %d of %d (%.0f%%); users=%d rooms=%d tasks=%d; "
                "raise --max-connections or add capacity",
                snap.connections, snap.max_connections, percent,
                snap.users, snap.rooms, snap.tasks_in_flight,
            )
        else:
            changed = snap != self._last
            (log.info if changed else log.debug)(
                "connections=%d/%d (%.0f%%) users=%d rooms=%d tasks=%d",
                snap.connections, snap.max_connections, percent,
                snap.users, snap.rooms, snap.tasks_in_flight,
            )
        self._last = snap
        return snap
