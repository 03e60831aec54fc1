"""The event loop the server runs on (``--loop``): asyncio's own or uvloop.

uvloop (libuv, in C) runs the same asyncio code with less CPU per callback,
socket operation and timer; uvicorn[standard] uses it the same way. ``auto``
takes it when it is installed (it is a dependency on CPython/Linux and macOS)
and falls back to asyncio's loop otherwise. Everything in wsserver works on
both; the in-process tests run on asyncio's loop, the server processes the
tests start on the default (uvloop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop ``name`` asks for; None: asyncio's default loop."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, Any], name: str) -> Any:
    """Run ``main`` to completion on a new loop of kind ``name`` (as ``asyncio.run``)."""
    with asyncio.Runner(loop_factory=loop_factory(name)) as runner:
        return runner.run(main)


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """The running loop's kind, for the start-up log."""
    if type(loop).__module__.split(".")[0] == "uvloop":
        from importlib.metadata import version

        return f"uvloop {version('uvloop')}"
    return "asyncio"
