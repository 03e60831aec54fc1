"""In-process servers for integration tests (pytest-tornado).

Tests get a real server on a free port through pytest-tornado's
``http_server`` fixture (which must be requested for the app to be served),
with ``server_flags`` overridable per test by parametrizing it. The clients
the tests use are in :mod:`tests.integration.clients`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import tornado.web

from tests.integration.clients import ORIGIN, SECRET, close_all
from wsserver.app import ServerState, make_app
from wsserver.config import load_settings
from wsserver.origin import OriginPolicy


@pytest.fixture
def server_flags() -> dict[str, str]:
    """Flags for the in-process server; parametrize this name to change them."""
    return {}


@pytest.fixture
def state(server_flags: dict[str, str]) -> Iterator[ServerState]:
    flags = {"jwt_secret": SECRET, "allowed_origins": ORIGIN, "jwt_leeway": "0"}
    flags.update(server_flags)
    settings = load_settings(flags, {})
    server_state = ServerState.from_settings(settings)
    if settings.default_origins:
        server_state.origins = OriginPolicy(settings.loopback_origins(settings.port))
    yield server_state
    server_state.pool.shutdown()


@pytest.fixture
def app(state: ServerState) -> tornado.web.Application:
    return make_app(state)


@pytest.fixture
def port(http_server: Any, http_port: int, state: ServerState) -> Iterator[int]:
    """The port of a running in-process server built from ``server_flags``.

    At the end it closes every client the test opened (also those the server
    closed first), before pytest-tornado closes the loop.
    """
    yield http_port
    close_all()
