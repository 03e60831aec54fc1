"""In-process servers for integration tests (pytest-tornado).

Tests get a real server on a free port through the ``http_server`` fixture
(which must be requested for the app to be served): the server's own public
listener, as ``wsserver.edge.server`` builds it, in place of pytest-tornado's
plain ``HTTPServer``. ``server_flags`` is overridable per test by parametrizing
it, and ``handshake_path`` chooses how a plain-TCP upgrade is answered
(``native``, as the server does, or ``tornado``). The clients the tests use
are :mod:`tests.support.clients` (and :mod:`tests.support.raw`).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import tornado.web

from tests.support.clients import ORIGIN, aclose_all
from tests.support.tokens import SECRET
from wsserver.config import load_settings
from wsserver.edge.app import make_app
from wsserver.edge.httpclient import AiohttpClient
from wsserver.edge.listener import Listener
from wsserver.edge.server import public_listener
from wsserver.rooms import RoomPolicy
from wsserver.services import Services

#: The room policy most integration tests run with: any user joins, members
#: publish. Tests of permissions parametrize ``rooms_table`` with their own.
OPEN_ROOMS: dict[str, Any] = {"join": "anyone", "publish": "members"}


@pytest.fixture
def server_flags() -> dict[str, str]:
    """Flags for the in-process server; parametrize this name to change them."""
    return {}


@pytest.fixture
def rooms_table() -> dict[str, Any]:
    """The config file's ``[rooms]`` table; parametrize this name to change it."""
    return OPEN_ROOMS


@pytest.fixture
def state(
    server_flags: dict[str, str], rooms_table: dict[str, Any], io_loop: Any
) -> Iterator[Services]:
    """The in-process server's :class:`Services`, its broker started."""
    flags = {"jwt_secret": SECRET, "allowed_origins": ORIGIN, "jwt_leeway": "0"}
    flags.update(server_flags)
    settings = load_settings(flags, {})
    settings = settings.replace(rooms=RoomPolicy.from_table(rooms_table))
    services = Services(settings, http=AiohttpClient())
    io_loop.run_sync(lambda: services.broker.start(services.hub))
    if services.key_set is not None:
        io_loop.run_sync(services.key_set.refresh)
    yield services
    io_loop.run_sync(services.broker.close)
    io_loop.run_sync(services.close_http)
    services.pool.shutdown()


@pytest.fixture
def app(state: Services) -> tornado.web.Application:
    return make_app(state)


@pytest.fixture
def handshake_path() -> str:
    """``native``: upgrades answered at accept time (the server's way);
    ``tornado``: every request through Tornado's HTTP server. Parametrize to change."""
    return "native"


@pytest.fixture
def http_server(
    request: pytest.FixtureRequest, io_loop: Any, _unused_port: tuple[socket.socket, int],
    state: Services, handshake_path: str,
) -> Iterator[Listener]:
    """The public listener of a server built from ``server_flags``, on a free port."""
    server = public_listener(state, None, native=handshake_path == "native")
    server.add_sockets([_unused_port[0]])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections,
                     timeout=request.config.option.async_test_timeout)


@pytest.fixture
def port(http_server: Any, http_port: int, state: Services, io_loop: Any) -> Iterator[int]:
    """The port of a running in-process server built from ``server_flags``.

    At the end it closes every client and raw connection the test opened
    (also those the server closed first), on the test's loop, before
    pytest-tornado closes it.
    """
    yield http_port
    io_loop.run_sync(aclose_all)
