"""``wsserver genconfig``: every option as a commented TOML file, from the declarations.

Each option of :data:`wsserver.config.OPTIONS` appears with its help and its
default, commented out (``#key = default``), so the file as printed
configures exactly the defaults, and removing a ``#`` changes one setting.
An option without a default is ``#key =``, to be filled in. The ``[rooms]``
table follows, commented out too: the defaults of
:class:`~wsserver.rooms.NamespacePolicy` and two example namespaces.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from typing import Any

from wsserver import __version__
from wsserver.config import OPTIONS, Option
from wsserver.rooms import JOIN_RULES, PUBLISH_RULES, NamespacePolicy

WIDTH = 79

#: What each key of a namespace policy means (the [rooms] table is not an option).
ROOM_KEYS = {
    "join": f"who may join: {' | '.join(JOIN_RULES)}",
    "publish": f"who may publish: {' | '.join(PUBLISH_RULES)}",
    "history_size": "messages kept per room, 0..10000 (0: no history)",
    "history_ttl": "seconds a room's history is kept after its last message",
    "presence": "members may ask who is in the room",
    "join_leave": "members get user_joined / user_left events",
}

#: The example namespaces: a chat, and each user's own room only the server writes to.
EXAMPLE_NAMESPACES: dict[str, dict[str, Any]] = {
    "chat": {"join": "anyone", "publish": "members", "history_size": 100, "presence": True,
             "join_leave": True},
    "user": {"join": "owner", "publish": "none"},
}

HEADER = """\
# wsserver configuration: every option, with its help and its default.
# Printed by `wsserver genconfig` (wsserver {version}).
#
# A line "#key = value" is the default, commented out: remove the "#" and
# change the value to set it. "#key =" has no default (the help says what
# happens without one). Precedence: flag > WSSERVER_<KEY> environment
# variable > this file > default. Check the file before using it:
#
#     wsserver check-config --config wsserver.toml
"""


def toml_value(value: Any) -> str:
    """``value`` (a default) as TOML: booleans, numbers, strings, lists of strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON's escapes (\" \\ \n \uXXXX) are TOML basic-string escapes too.
        return json.dumps(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - 2, initial_indent="# ", subsequent_indent="# ",
                         break_on_hyphens=False)


def _option(option: Option) -> list[str]:
    key = option.flag[2:]
    lines = _comment(option.help[0].upper() + option.help[1:] + ".")
    if option.default is None:
        return [*lines, f"#{key} ="]
    return [*lines, f"#{key} = {toml_value(option.default)}"]


def _rooms() -> list[str]:
    defaults = NamespacePolicy()
    lines = [
        "# Who may join and publish where: the default namespace (rooms without",
        "# a ':', and undeclared namespaces), then one table per namespace (the",
        "# part of a room name before its first ':'). Only this file sets it.",
        "# Without a [rooms] table: the values below, except in demo mode (no JWT",
        "# key), where anyone joins and members publish in the default namespace",
        "# and user:<sub> is as in the example. A declared namespace starts from",
        "# these defaults, not from [rooms]. 'owner': only the user whose sub is",
        "# the part after 'ns:' joins.",
        "#[rooms]",
    ]
    width = max(len(f"#{name} = {toml_value(getattr(defaults, name))}") for name in ROOM_KEYS)
    for field in dataclasses.fields(NamespacePolicy):
        line = f"#{field.name} = {toml_value(getattr(defaults, field.name))}"
        lines.append(f"{line.ljust(width)}  # {ROOM_KEYS[field.name]}")
    for name, policy in EXAMPLE_NAMESPACES.items():
        lines.append("")
        lines.append(f"#[rooms.namespaces.{name}]")
        lines.extend(f"#{key} = {toml_value(value)}" for key, value in policy.items())
    return lines


def render() -> str:
    """The whole file."""
    lines = [HEADER.format(version=__version__).rstrip("\n")]
    for option in OPTIONS:
        lines.append("")
        lines.extend(_option(option))
    lines.append("")
    lines.extend(_rooms())
    return "\n".join(lines) + "\n"
