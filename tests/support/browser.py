"""Debian's Chromium driven by Playwright, for the end-to-end page tests.

The browser is the system one (``/usr/bin/chromium``); ``playwright install``
is never needed. The fixtures (``chromium``, ``pages``) are in
``tests/e2e/conftest.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Error, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Pages:
    """Opens pages in separate browser contexts and records their console errors."""

    browser: Browser
    contexts: list[BrowserContext] = field(default_factory=list)
    #: (page label, text) of every console error and uncaught exception.
    errors: list[tuple[str, str]] = field(default_factory=list)

    def open(self, url: str, label: str = "", *, init_script: str | None = None,
             **context_options: Any) -> Page:
        """A new page in its own context (own storage, so its own demo user), at ``url``.

        ``init_script`` runs in the page before any of its own scripts (to take
        a browser API away, say).
        """
        context = self.browser.new_context(**context_options)
        if init_script is not None:
            context.add_init_script(init_script)
        self.contexts.append(context)
        page = context.new_page()
        name = label or f"page{len(self.contexts)}"

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.errors.append((name, message.text))

        def on_page_error(error: Error) -> None:
            self.errors.append((name, f"uncaught: {error}"))

        page.on("console", on_console)
        page.on("pageerror", on_page_error)
        page.goto(url)
        return page

    def errors_except(self, *patterns: str) -> list[tuple[str, str]]:
        """Recorded errors that match none of ``patterns`` (regular expressions)."""
        return [
            (name, text)
            for name, text in self.errors
            if not any(re.search(pattern, text) for pattern in patterns)
        ]

    def close(self) -> None:
        """Closes every context opened."""
        for context in self.contexts:
            context.close()
        self.contexts.clear()
