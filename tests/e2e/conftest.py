"""Browser fixtures for the end-to-end tests (:mod:`tests.support.browser`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, Pages


# Module scope, not session: while Playwright's sync API is active it keeps an
# asyncio loop marked as running on the main thread, and every later test
# that runs a loop of its own (asyncio.run, pytest-tornado) would fail.
@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """One headless Chromium for the whole session; each test gets fresh contexts."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def pages(chromium: Browser) -> Iterator[Pages]:
    """Page factory for one test; its contexts are closed at the end."""
    opened = Pages(chromium)
    yield opened
    opened.close()
