"""Waiting for a state nothing announces (an HTTP answer, another node's view): polled,
bounded, and failing with what was last seen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
WAIT = 10.0


def poll(check: Callable[[], T | None], what: str, timeout: float = WAIT,
         every: float = 0.05) -> T:
    """Until ``check()`` answers something true; its answer. Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s (last: {last!r})")
        time.sleep(every)


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     timeout: float = WAIT, every: float = 0.02) -> None:
    """Until ``await check()`` holds; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(every)


async def until(condition: Callable[[], bool], timeout: float = WAIT,
                every: float = 0.02) -> float:
    """Until ``condition()`` holds (state inside another process, which sends no
    event); the seconds it took. Fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(every)
    return time.monotonic() - started
