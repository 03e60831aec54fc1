"""The pure core imports no Tornado: only the edge modules may."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import wsserver
import wsserver.brokers

#: Not core: the edge package (Tornado's side) and the ``python -m`` entry.
NOT_CORE = {"edge", "__main__"}


def core_modules() -> list[str]:
    """Every module of the package outside ``wsserver.edge``, brokers included
    (a new module is checked without an edit)."""
    top = [
        f"wsserver.{info.name}" for info in pkgutil.iter_modules(wsserver.__path__)
        if info.name not in NOT_CORE and not info.ispkg
    ]
    brokers = [
        f"wsserver.brokers.{info.name}" for info in pkgutil.iter_modules(wsserver.brokers.__path__)
    ]
    return [*top, "wsserver.brokers", *brokers]


def test_every_core_module_is_listed() -> None:
    listed = set(core_modules())
    assert {"wsserver.brokers.base", "wsserver.brokers.memory", "wsserver.session",
            "wsserver.hub", "wsserver.services", "wsserver.cli"} <= listed
    assert not any(name.startswith("wsserver.edge") for name in listed)


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


def test_the_check_sees_tornado_when_it_is_imported() -> None:
    """The same check on an edge module fails, so the test above can fail."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, wsserver.edge.app; print('tornado' in sys.modules)"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert result.stdout.strip() == "True"
