"""The pure core imports no Tornado and no aiohttp: only the edge modules (and
the Python client's I/O) may."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import wsserver
import wsserver.brokers
import wsserver.client

#: Not core: the edge package (Tornado's side) and the ``python -m`` entry.
NOT_CORE = {"edge", "__main__"}
#: The Python client's I/O is an edge too, on the other end of the wire: its
#: WebSocket and HTTP connections go through aiohttp (as the server's own
#: outbound calls do, in ``edge/httpclient.py``). Everything the client
#: decides is in its pure modules, checked here, and ``wsserver.client`` loads
#: ``Client`` lazily so that they import without aiohttp.
CLIENT_IO = {"connection", "api"}
#: What the pure core never loads: the server's and the client's I/O libraries.
IO_LIBRARIES = ("tornado", "aiohttp")


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


def test_the_core_imports_neither_tornado_nor_aiohttp() -> None:
    # A fresh interpreter: this one has Tornado loaded by the other tests.
    script = (
        "import importlib, sys\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        f"    if any(lib in sys.modules for lib in {IO_LIBRARIES!r}):\n"
        "        print(name)\n"
        "        break\n"
        f"print(any(lib in sys.modules for lib in {IO_LIBRARIES!r}),\n"
        "      sorted(m for m in sys.modules if m.startswith('wsserver')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith("False"), f"{first_line} pulls Tornado or aiohttp in"
    # The check really imported what it names (not an empty loop).
    for name in core_modules():
        assert repr(name) in result.stdout


def test_the_client_io_layer_is_where_aiohttp_comes_in() -> None:
    """``from wsserver.client import Client`` loads the I/O layer, and aiohttp with it."""
    result = subprocess.run(
        [sys.executable, "-c",
         "import sys, wsserver.client as c; before = 'aiohttp' in sys.modules; c.Client; "
         "print(before, 'aiohttp' in sys.modules)"],
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
