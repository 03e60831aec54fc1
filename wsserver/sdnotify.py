"""systemd notifications (``sd_notify``) without a systemd Python binding.

A service started with ``Type=notify`` tells systemd how it is doing by
sending newline-separated ``KEY=VALUE`` lines in one datagram to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (see ``sd_notify(3)``):
``READY=1`` once it serves, ``STOPPING=1`` when it begins to shut down,
``STATUS=...`` as free text for ``systemctl status``, and ``WATCHDOG=1`` at
least once per ``$WATCHDOG_USEC`` when the unit sets ``WatchdogSec=``.

Outside systemd (no ``NOTIFY_SOCKET``) the notifier is inert: every call is
a cheap no-op returning ``False``, so the server calls it unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: A notification is one small datagram to a local socket that systemd reads
#: at once; bound the wait so a stuck manager cannot stall the event loop.
SEND_TIMEOUT = 1.0


def socket_address(value: str | None) -> bytes | None:
    """The ``AF_UNIX`` address named by a ``NOTIFY_SOCKET`` value.

    Args:
        value: an absolute path, or ``@name`` for a Linux abstract socket.

    Returns:
        The address as bytes (abstract names start with a NUL byte), or None
        when the value is unset, empty or of a kind not supported here (such
        as systemd's ``vsock:`` addresses for virtual machines).
    """
    if not value:
        return None
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        # sd_notify(3): a leading '@' stands for the NUL byte of an abstract name.
        return b"\0" + os.fsencode(value[1:])
    return None


def watchdog_interval_from(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings asked for by ``environ``, or None.

    Half of ``WATCHDOG_USEC``, as ``sd_watchdog_enabled(3)`` advises, so that
    one late ping does not get the service killed. When ``WATCHDOG_PID`` is
    set and names another process, the watchdog is not ours to feed.
    """
    raw_usec = environ.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            watchdog_pid = int(raw_pid)
        except ValueError:
            return None
        if watchdog_pid != (os.getpid() if pid is None else pid):
            return None
    return usec / 2 / 1_000_000


class SystemdNotifier:
    """Sends ``sd_notify`` datagrams to systemd, or does nothing when inert.

    Args:
        address: the notify socket's ``AF_UNIX`` address (see
            :func:`socket_address`); None makes the notifier inert.
        watchdog_interval: seconds between watchdog pings, or None.
    """

    def __init__(self, address: bytes | None, watchdog_interval: float | None = None) -> None:
        self._address = address
        self._watchdog_interval = watchdog_interval if address is not None else None
        self._socket: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> SystemdNotifier:
        """A notifier for the socket and watchdog that ``environ`` describes."""
        address = socket_address(environ.get("NOTIFY_SOCKET"))
        if address is None and environ.get("NOTIFY_SOCKET"):
            log.warning("NOTIFY_SOCKET is not a path or an abstract name; not notifying systemd")
        return cls(address, watchdog_interval_from(environ))

    @property
    def enabled(self) -> bool:
        """True when notifications go somewhere."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` calls, or None when no watchdog runs."""
        return self._watchdog_interval

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``KEY=VALUE`` each) as one notification.

        Returns:
            True when the datagram was sent; False when inert or when the
            send failed (logged, never raised: a lost notification must not
            take the server down).

        Raises:
            ValueError: a line holds a newline, which would split it in two.
        """
        if any("\n" in line for line in lines):
            raise ValueError("a notification line cannot contain a newline")
        if self._address is None or not lines:
            return False
        payload = "\n".join(lines).encode("utf-8")
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.settimeout(SEND_TIMEOUT)
            self._socket.sendto(payload, self._address)
        except OSError as exc:
            log.warning("could not notify systemd: %s", exc)
            return False
        return True

    def ready(self) -> bool:
        """Tell systemd the server listens and serves (``READY=1``)."""
        return self.notify("READY=1", "STATUS=serving")

    def stopping(self) -> bool:
        """Tell systemd the server has begun to drain (``STOPPING=1``)."""
        return self.notify("STOPPING=1", "STATUS=draining connections")

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Feed the watchdog (``WATCHDOG=1``); call every :attr:`watchdog_interval`."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the sending socket; a later notification opens a new one."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __repr__(self) -> str:
        where = None
        if self._address is not None:
            where = self._address.decode("utf-8", "replace").replace("\0", "@")
        return f"SystemdNotifier({where!r}, watchdog_interval={self._watchdog_interval!r})"
