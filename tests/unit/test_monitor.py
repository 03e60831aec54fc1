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


def test_an_idle_server_logs_its_counts_once(caplog: pytest.LogCaptureFixture) -> None:
    counts = [Snapshot(0, 0, 0, 0, max_connections=100)] * 3 + [
        Snapshot(5, 2, 1, 0, max_connections=100)] * 2 + [Snapshot(5, 2, 1, 1, 100)]
    snapshots = iter(counts)
    monitor = ConnectionMonitor(lambda: next(snapshots))
    with caplog.at_level(logging.DEBUG, logger="wsserver.monitor"):
        for _ in counts:
            monitor.check()
    # INFO when a count changed (the first check counts as a change), DEBUG otherwise.
    assert [record.levelno for record in caplog.records] == [
        logging.INFO, logging.DEBUG, logging.DEBUG, logging.INFO, logging.DEBUG, logging.INFO]
    assert caplog.records[0].getMessage() == caplog.records[1].getMessage()


def test_near_the_cap_every_check_warns(caplog: pytest.LogCaptureFixture) -> None:
    monitor = ConnectionMonitor(lambda: Snapshot(95, 1, 1, 0, max_connections=100))
    with caplog.at_level(logging.INFO, logger="wsserver.monitor"):
        for _ in range(3):
            monitor.check()
    assert [record.levelno for record in caplog.records] == [logging.WARNING] * 3
