"""The pure core imports no Tornado: only the edge modules may."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import wsserver
import wsserver.brokers
import wsserver.client

#: Not core: the edge package (Tornado's side) and the ``python -m`` entry.
NOT_CORE = {"edge", "__main__"}
#: The Python client's I/O layer is an edge too, on the other end of the wire:
#: its sockets and HTTP requests go through Tornado's ``websocket_connect`` and
#: ``AsyncHTTPClient`` (the server's own dependency, so the client adds none).
#: Everything it decides is in the client's pure modules, checked below, and
#: ``wsserver.client`` itself loads ``Client`` lazily so they stay importable
#: without Tornado.
CLIENT_IO = {"connection", "api"}


def core_modules() -> list[str]:
    """Every module of the package outside ``wsserver.edge`` and the client's
    I/O, brokers and the client's pure modules included (a new module is
    checked without an edit)."""
    top = [
        f"wsserver.{info.name}" for info in pkgutil.iter_modules(wsserver.__path__)
        if info.name not in NOT_CORE and not info.ispkg
    ]
    brokers = [
        f"wsserver.brokers.{info.name}" for info in pkgutil.iter_modules(wsserver.brokers.__path__)
    ]
    client = [
        f"wsserver.client.{info.name}" for info in pkgutil.iter_modules(wsserver.client.__path__)
        if info.name not in CLIENT_IO
    ]
    return [*top, "wsserver.brokers", *brokers, "wsserver.client", *client]


def test_every_core_module_is_listed() -> None:
    listed = set(core_modules())
    assert {"wsserver.brokers.base", "wsserver.brokers.memory", "wsserver.session",
            "wsserver.hub", "wsserver.services", "wsserver.cli", "wsserver.client",
            "wsserver.client.machine", "wsserver.client.decisions"} <= listed
    assert not any(name.startswith("wsserver.edge") for name in listed)
    assert not listed & {f"wsserver.client.{name}" for name in CLIENT_IO}


def test_the_core_imports_no_tornado() -> None:
    # A fresh interpreter: this one has Tornado loaded by the other tests.
    script = (
        "import importlib, sys\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "    if 'tornado' in sys.modules:\n"
        "        print(name)\n"
        "        break\n"
        "print('tornado' in sys.modules, sorted(m for m in sys.modules if m.startswith('wsserver')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith("False"), f"{first_line} pulls Tornado in"
    # The check really imported what it names (not an empty loop).
    for name in core_modules():
        assert repr(name) in result.stdout


def test_the_client_io_layer_is_where_tornado_comes_in() -> None:
    """``from wsserver.client import Client`` loads the I/O layer, and Tornado with it."""
    result = subprocess.run(
        [sys.executable, "-c",
         "import sys, wsserver.client as c; before = 'tornado' in sys.modules; c.Client; "
         "print(before, 'tornado' in sys.modules)"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert result.stdout.split() == ["False", "True"]


def test_the_check_sees_tornado_when_it_is_imported() -> None:
    """The same check on an edge module fails, so the test above can fail."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, wsserver.edge.app; print('tornado' in sys.modules)"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert result.stdout.strip() == "True"
