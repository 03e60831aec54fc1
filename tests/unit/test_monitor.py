"""The monitor's WARNING at 90 % of the cap."""

import logging

import pytest

from wsserver.monitor import ConnectionMonitor, Snapshot


@pytest.mark.parametrize(
    ("connections", "level"),
    [(0, logging.INFO), (89, logging.INFO), (90, logging.WARNING), (100, logging.WARNING)],
)
def test_warning_at_ninety_percent(
    caplog: pytest.LogCaptureFixture, connections: int, level: int
) -> None:
    swept = []
    monitor = ConnectionMonitor(
        lambda: Snapshot(connections, 1, 2, 3, max_connections=100), lambda: swept.append(1)
    )
    with caplog.at_level(logging.INFO, logger="wsserver.monitor"):
        snap = monitor.check()
    assert snap.connections == connections
    assert [record.levelno for record in caplog.records] == [level]
    assert swept == [1]
