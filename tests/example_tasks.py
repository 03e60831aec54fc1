"""An example ``--tasks-module``: two tasks of a user's own.

Run the server with them (from the repository root)::

    PYTHONPATH=. .venv/bin/wsserver --tasks-module tests.example_tasks

docs/tasks.md walks through this file; tests/unit/test_tasks.py and
tests/integration/test_task_messages.py run it, so the example cannot rot.
"""

from __future__ import annotations

import re

from wsserver.tasks import Int, Str, TaskTable

tasks = TaskTable()


@tasks.task("fibonacci", n=Int(0, 78))
def fibonacci(n: int) -> int:
    """The n-th Fibonacci number. 78 is the last a JavaScript number holds exactly."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@tasks.task("word_count", text=Str(max_length=20_000))
def word_count(text: str) -> dict[str, int]:
    """How often each word of ``text`` appears, lower-cased, most frequent first."""
    counts: dict[str, int] = {}
    for word in re.findall(r"\w+", text.lower()):
        counts[word] = counts.get(word, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
