"""Print the README's configuration table from wsserver.config.OPTIONS.

Run: python -m scripts.options_table  (tests/unit/test_docs.py checks the
README holds exactly this table).
"""

from __future__ import annotations

from wsserver.config import OPTIONS


def options_table() -> str:
    """The Markdown table of every option: flag, environment variable, default, meaning."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for option in OPTIONS:
        default = option.default
        if isinstance(default, tuple):
            default = ",".join(default) or "none"
        shown = "—" if default is None else f"`{default}`"
        rows.append(f"| `{option.flag}` | `{option.env}` | {shown} | {option.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_table())
