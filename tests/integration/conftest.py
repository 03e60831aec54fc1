"""In-process servers for integration tests (pytest-tornado).

Tests get a real server on a free port through pytest-tornado's
``http_server`` fixture (which must be requested for the app to be served),
with ``server_flags`` overridable per test by parametrizing it. The clients
the tests use are :mod:`tests.support.clients` (and :mod:`tests.support.raw`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import tornado.web

from tests.support.clients import ORIGIN, aclose_all
from tests.support.tokens import SECRET
from wsserver.config import load_settings
from wsserver.edge.app import make_app
from wsserver.edge.httpclient import AiohttpClient
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
def port(http_server: Any, http_port: int, state: Services, io_loop: Any) -> Iterator[int]:
    """The port of a running in-process server built from ``server_flags``.

    At the end it closes every client and raw connection the test opened
    (also those the server closed first), on the test's loop, before
    pytest-tornado closes it.
    """
    yield http_port
    io_loop.run_sync(aclose_all)
