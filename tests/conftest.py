"""Fixtures shared by every test: thin wrappers over :mod:`tests.support`.

``run_server`` starts real ``python -m wsserver`` processes
(:class:`tests.support.servers.RunningServer`) and stops them at the end;
``redis`` is a ``redis-server`` of the test's own; ``io_loop`` is
pytest-tornado's loop without its leak.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from tornado.ioloop import IOLoop

from tests.support.backend import AppBackend, running_backend
from tests.support.clients import close_all
from tests.support.redis_server import RedisServer, require_redis_server
from tests.support.servers import ServerFactory


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` of the test's own on a free loopback port
    (never the system service), stopped at the end."""
    require_redis_server()
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def app_backend() -> Iterator[AppBackend]:
    """The application's backend (cookie sessions, the proxies, a JWKS) on a free
    loopback port, in a thread of its own (:mod:`tests.support.backend`)."""
    with running_backend() as backend:
        yield backend


@pytest.fixture
def run_server() -> Iterator[ServerFactory]:
    """Factory: ``run_server(*args, env=None, max_files=None, launcher=(), wait=True)``
    → a started :class:`~tests.support.servers.RunningServer`, stopped at the end.

    ``env`` is added to a clean copy of the environment without any
    ``WSSERVER_*`` variables of the caller's.
    """
    factory = ServerFactory()
    yield factory
    factory.stop_all()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Every client a test opened and left open is closed at its end (the sync
    ones; async ones are closed by their loop's owner first)."""
    yield
    close_all()


@pytest.fixture
def io_loop() -> Iterator[IOLoop]:
    """pytest-tornado's per-test loop, without its leak.

    pytest-tornado builds ``IOLoop()``, which makes itself current by first
    calling ``asyncio.get_event_loop()``; in a thread where no loop was ever
    set, that call *creates* a loop that nobody closes. Tornado restores it as
    the current loop at the end, and the next ``asyncio.run()`` drops it, so
    whichever test happens to run a garbage collection next failed with
    "unclosed event loop" (``filterwarnings = error``). Here the loop is built
    without that lookup and closed at the end, and no other loop is created.
    """
    loop = IOLoop(make_current=False)
    asyncio.set_event_loop(loop.asyncio_loop)  # type: ignore[attr-defined]
    try:
        yield loop
    finally:
        asyncio.set_event_loop(None)
        loop.close(all_fds=True)
