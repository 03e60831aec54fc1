"""SystemdNotifier against real AF_UNIX datagram sockets (a path and an abstract name)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping

import pytest

from tests.support import notify
from tests.support.notify import NotifySocket
from wsserver.sdnotify import SystemdNotifier, socket_address, watchdog_interval_from


@pytest.fixture
def path_socket() -> Iterator[NotifySocket]:
    with notify.path_socket() as listener:
        yield listener


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    with notify.abstract_socket() as listener:
        yield listener


@pytest.fixture
def make_notifier() -> Iterator[Callable[[Mapping[str, str]], SystemdNotifier]]:
    """Build notifiers from an environment and close them at the end."""
    made: list[SystemdNotifier] = []

    def make(environ: Mapping[str, str]) -> SystemdNotifier:
        made.append(SystemdNotifier.from_environ(environ))
        return made[-1]

    yield make
    for notifier in made:
        notifier.close()


MakeNotifier = Callable[[Mapping[str, str]], SystemdNotifier]


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, path_socket: NotifySocket, abstract_socket: NotifySocket
) -> NotifySocket:
    return path_socket if request.param == "path" else abstract_socket


def test_ready_stopping_status_watchdog_arrive(
    notify_socket: NotifySocket, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier({"NOTIFY_SOCKET": notify_socket.env_value})
    assert notifier.enabled
    assert notifier.ready() is True
    assert notify_socket.receive() == ["READY=1", "STATUS=serving"]
    assert notifier.status("1 connection\nopen") is True
    assert notify_socket.receive() == ["STATUS=1 connection open"]
    assert notifier.watchdog() is True
    assert notify_socket.receive() == ["WATCHDOG=1"]
    assert notifier.stopping() is True
    assert notify_socket.receive() == ["STOPPING=1", "STATUS=draining connections"]


def test_notify_sends_lines_in_one_datagram(
    path_socket: NotifySocket, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier({"NOTIFY_SOCKET": path_socket.env_value})
    assert notifier.notify("STATUS=a", "EXTEND_TIMEOUT_USEC=5000000") is True
    assert path_socket.receive() == ["STATUS=a", "EXTEND_TIMEOUT_USEC=5000000"]
    assert not path_socket.pending()
    notifier.close()
    # A closed notifier opens a fresh socket on the next notification.
    assert notifier.watchdog() is True
    assert path_socket.receive() == ["WATCHDOG=1"]


def test_a_newline_inside_a_line_is_refused(
    path_socket: NotifySocket, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier({"NOTIFY_SOCKET": path_socket.env_value})
    with pytest.raises(ValueError):
        notifier.notify("STATUS=ok\nREADY=1")
    assert not path_socket.pending()


def test_inert_without_notify_socket() -> None:
    notifier = SystemdNotifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready() is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False


def test_a_vanished_socket_is_reported_not_raised(
    path_socket: NotifySocket, make_notifier: MakeNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = make_notifier({"NOTIFY_SOCKET": path_socket.env_value})
    path_socket.sock.close()
    os.unlink(path_socket.env_value)
    assert notifier.ready() is False
    assert "could not notify systemd" in caplog.text


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", b"/run/systemd/notify"),
        ("@/org/freedesktop/systemd1/notify/42", b"\0/org/freedesktop/systemd1/notify/42"),
        ("", None),
        (None, None),
        ("@", None),
        ("relative/path", None),
        ("vsock:2:1234", None),
    ],
)
def test_socket_address(value: str | None, address: bytes | None) -> None:
    assert socket_address(value) == address


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval_from(environ, pid=4242) == interval


def test_watchdog_pid_defaults_to_this_process() -> None:
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval_from(mine) == 1.0
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/run/x", **mine})
    assert notifier.watchdog_interval == 1.0
    theirs = {**mine, "WATCHDOG_PID": str(os.getpid() + 1)}
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/run/x", **theirs})
    assert notifier.watchdog_interval is None


def test_repr_shows_the_socket() -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@abc"})
    assert repr(notifier) == "SystemdNotifier('@abc', watchdog_interval=None)"
