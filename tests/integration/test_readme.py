"""The README's Python snippets run as pasted, against a real demo-mode server."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import welcomed_sync
from tests.support.servers import ROOT

README_ADDRESS = "127.0.0.1:8888"


def python_snippets() -> list[str]:
    """Every ```python block of the README, in order."""
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)


def test_the_readme_has_a_python_snippet() -> None:
    snippets = python_snippets()
    assert snippets, "the README lost its Python example"
    # A complete program: it gets its own token and runs its coroutine.
    assert all("asyncio.run(" in snippet for snippet in snippets)


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_readme_python_snippet_runs_as_pasted(
    index: int, run_server: Callable[..., Any], tmp_path: Any
) -> None:
    srv = run_server()  # demo mode, as the README's first command starts it
    snippet = python_snippets()[index]
    assert README_ADDRESS in snippet
    # The only change: the port this test's server got instead of 8888.
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace(README_ADDRESS, f"127.0.0.1:{srv.port}"))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
        timeout=30, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("{'type': 'welcome', 'user': 'alice'")
    assert lines[1] == "{'type': 'echo', 'data': 'hi', 'id': 1}"


def readme_command(marker: str) -> str:
    """The README's shell command line holding ``marker``, its comment removed."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)
    (line,) = [line for block in blocks for line in block.splitlines() if marker in line]
    return line.split("  #", 1)[0].strip()


def test_the_readme_tasks_module_command_works_as_documented(
    run_server: Callable[..., Any],
) -> None:
    command = readme_command("--tasks-module")
    assert ".venv/bin/wsserver" in command
    # As typed at the checkout's root (RunningServer's working directory), with
    # this venv's wsserver for .venv/bin/wsserver, and a free port instead of 8888.
    script = Path(sys.executable).with_name("wsserver")
    typed = command.replace(".venv/bin/wsserver", shlex.quote(str(script))) + " --port 0"
    # The launcher runs the README's line ("exec env" keeps one process, which
    # gets the fixture's SIGTERM; "VAR=x cmd" means the same to sh as
    # "env VAR=x cmd"); what RunningServer appends after it ("python -m
    # wsserver --port 0") only becomes sh's unused $0, $1...
    srv = run_server(launcher=("sh", "-c", f"exec env {typed}"))
    client = welcomed_sync(srv, srv.demo_token("alice"), origin=srv.url)
    reply = client.ask({"type": "task", "name": "fibonacci", "args": {"n": 10}, "id": 1})
    assert reply == {"type": "result", "name": "fibonacci", "value": 55, "id": 1}
    client.close()
