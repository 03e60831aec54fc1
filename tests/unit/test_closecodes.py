"""wsserver/closecodes.py and static/wsclient.js's close-code table stay equal."""

from __future__ import annotations

import re
from pathlib import Path

from wsserver.closecodes import CloseCode

WSCLIENT = Path(__file__).resolve().parents[2] / "static" / "wsclient.js"
TABLE = re.compile(r"export const CLOSE_CODES = Object\.freeze\(\{\n(.*?)\n\}\);", re.DOTALL)
ROW = re.compile(r"^\s*(\d{4}): \{ reconnect: '(\w+)', text: '([^']*)' \},$")


def client_table() -> dict[int, tuple[str, str]]:
    """code -> (what the client does, its text), parsed from wsclient.js."""
    found = TABLE.search(WSCLIENT.read_text())
    assert found, "CLOSE_CODES not found in static/wsclient.js"
    rows: dict[int, tuple[str, str]] = {}
    for line in found.group(1).splitlines():
        row = ROW.match(line)
        assert row, f"unexpected line in CLOSE_CODES: {line!r}"
        rows[int(row.group(1))] = (row.group(2), row.group(3))
    return rows


def test_the_client_knows_every_code_the_server_sends_and_no_other() -> None:
    assert sorted(client_table()) == sorted(int(code) for code in CloseCode)


def test_the_client_does_what_the_server_table_says() -> None:
    table = client_table()
    wrong = {
        int(code): (code.reconnect, table[int(code)][0])
        for code in CloseCode
        if table[int(code)][0] != code.reconnect
    }
    assert wrong == {}, "code: (closecodes.py, wsclient.js)"


def test_every_client_text_is_said() -> None:
    assert all(text for _, text in client_table().values())


PROTOCOL_DOC = WSCLIENT.parents[1] / "docs" / "protocol.md"
#: How docs/protocol.md words each of CloseCode's reconnect values.
DOC_ACTIONS = {
    "never": ("nothing", "do not reconnect"),
    "soon": ("reconnect after a short random delay",),
    "backoff": ("reconnect with backoff",),
    "new_token": ("get a new token, then reconnect",),
    "fix_client": ("fix the client",),
}


def test_the_docs_table_lists_every_code_with_the_same_advice() -> None:
    text = PROTOCOL_DOC.read_text()
    section = text.split("## Close codes", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in section.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[int(cells[0])] = cells[-1]
    assert sorted(rows) == sorted(int(code) for code in CloseCode)
    for code in CloseCode:
        assert rows[int(code)] in DOC_ACTIONS[code.reconnect], (int(code), rows[int(code)])
