"""A real ``AF_UNIX`` datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import tempfile
import time
from collections.abc import Iterator


class NotifySocket:
    """A bound datagram socket; ``env_value`` is what ``NOTIFY_SOCKET`` names it by."""

    def __init__(self, address: bytes, env_value: str) -> None:
        self.env_value = env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def receive(self) -> list[str]:
        """The lines of the next datagram."""
        return self.sock.recv(4096).decode().split("\n")

    def pending(self) -> bool:
        """True when a datagram waits to be read."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def wait_for(self, line: str, timeout: float = 30.0) -> list[list[str]]:
        """Datagrams up to and including the first holding ``line``."""
        seen: list[list[str]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {line!r} within {timeout} s; got {seen}")
            self.sock.settimeout(remaining)
            try:
                lines = self.receive()
            except TimeoutError:
                continue
            seen.append(lines)
            if line in lines:
                return seen

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def path_socket() -> Iterator[NotifySocket]:
    """A :class:`NotifySocket` at a filesystem path, removed at the end."""
    # AF_UNIX paths are limited to 108 bytes: keep the directory short.
    with tempfile.TemporaryDirectory(prefix="wsn-", dir="/tmp") as directory:
        path = os.path.join(directory, "notify")
        listener = NotifySocket(os.fsencode(path), path)
        try:
            yield listener
        finally:
            listener.close()


@contextlib.contextmanager
def abstract_socket() -> Iterator[NotifySocket]:
    """A :class:`NotifySocket` with an abstract name (``@name``; Linux)."""
    name = "wsserver-test-" + secrets.token_hex(8)
    listener = NotifySocket(b"\0" + name.encode(), "@" + name)
    try:
        yield listener
    finally:
        listener.close()
