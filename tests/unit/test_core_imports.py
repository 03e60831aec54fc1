"""The pure core imports no Tornado: only the edge modules may."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import wsserver.brokers

#: The core: everything a Session, the Hub and Services need, and the pure helpers.
CORE = [
    "origin", "netaddr", "ratelimit", "registry", "protocol", "frames", "tasks", "errors",
    "auth", "rooms", "config", "session", "hub", "services", "closecodes", "transport",
    "metrics", "monitor", "pool", "brokers",
]


def core_modules() -> list[str]:
    """The core modules, every broker included (a new one is checked without an edit)."""
    brokers = [
        f"wsserver.brokers.{info.name}" for info in pkgutil.iter_modules(wsserver.brokers.__path__)
    ]
    return [f"wsserver.{name}" for name in CORE] + brokers


def test_every_broker_module_is_listed() -> None:
    assert {"wsserver.brokers.base", "wsserver.brokers.memory"} <= set(core_modules())


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
        [sys.executable, "-c", "import sys, wsserver.app; print('tornado' in sys.modules)"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert result.stdout.strip() == "True"
