"""Running one test's async scenario on a fresh event loop, bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tests.support.clients import aclose_all

T = TypeVar("T")
#: The most one scenario may take; a hung one fails with every task's stack.
SCENARIO_TIMEOUT = 60.0


def run(scenario: Callable[[], Awaitable[T]] | Awaitable[T],
        timeout: float = SCENARIO_TIMEOUT) -> T:
    """Run ``scenario`` (a coroutine function or a coroutine) on a fresh loop.

    Every client and raw connection it opened is closed before the loop is
    (also when it fails, so a failing test reports its assertion, not
    unclosed sockets). On timeout the stacks of every task are printed (what
    hung), then the test fails.
    """

    async def bounded() -> T:
        awaitable = scenario() if callable(scenario) else scenario
        task: asyncio.Future[T] = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait([task], timeout=timeout)
            if not done:
                stacks = io.StringIO()
                for other in asyncio.all_tasks():
                    other.print_stack(file=stacks)
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise AssertionError(
                    f"scenario did not finish in {timeout} s; tasks:\n{stacks.getvalue()}"
                )
            return task.result()
        finally:
            await aclose_all()

    return asyncio.run(bounded())
