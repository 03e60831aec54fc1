"""wsserver genconfig: the file it prints is every option's default, from the declarations."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from wsserver.config import OPTIONS, load_settings
from wsserver.genconfig import render, toml_value
from wsserver.rooms import NamespacePolicy, RoomPolicy

#: A commented-out setting or table: "#key = value", "#[rooms]" (never "# text").
SETTING = re.compile(r"^#(?=[\w\[-])")


def uncommented(text: str) -> str:
    """``text`` with every commented-out setting and table that has a value made live."""
    return "\n".join(
        SETTING.sub("", line) if SETTING.match(line) and not line.endswith("=") else line
        for line in text.splitlines()
    )


def test_every_option_appears_once_with_its_help() -> None:
    text = render()
    for option in OPTIONS:
        key = option.flag[2:]
        lines = [line for line in text.splitlines() if re.match(rf"#{re.escape(key)} =", line)]
        assert len(lines) == 1, key
        assert (lines[0] == f"#{key} =") == (option.default is None), lines
        # The help, rewrapped, is in the comment lines right above.
        above = text[: text.index(lines[0] + "\n")].rsplit("\n\n", 1)[-1]
        comment = " ".join(line.removeprefix("# ") for line in above.splitlines())
        assert option.help[1:] in comment, key


def test_as_printed_it_is_valid_toml_that_sets_nothing(tmp_path: Path) -> None:
    text = render()
    assert tomllib.loads(text) == {}
    path = tmp_path / "wsserver.toml"
    path.write_text(text)
    # The same key both ways: demo mode's ephemeral one differs on every call.
    keyed = {"WSSERVER_JWT_SECRET": "k" * 32}
    assert load_settings({"config": str(path)}, keyed) == load_settings({}, keyed)


def test_every_printed_default_is_the_declared_default(tmp_path: Path) -> None:
    path = tmp_path / "wsserver.toml"
    path.write_text(uncommented(render()))
    data = tomllib.loads(path.read_text())
    declared = {o.flag[2:] for o in OPTIONS if o.default is not None}
    assert declared <= data.keys()
    # The file, now setting every default and the example [rooms], gives the defaults.
    settings = load_settings({"config": str(path)}, {"WSSERVER_JWT_SECRET": "k" * 32})
    plain = load_settings({}, {"WSSERVER_JWT_SECRET": "k" * 32})
    for option in OPTIONS:
        assert getattr(settings, option.name) == getattr(plain, option.name), option.name
    assert settings.rooms_from_file
    assert settings.rooms == RoomPolicy(
        NamespacePolicy(),
        {"chat": NamespacePolicy(join="anyone", publish="members", history_size=100,
                                 presence=True, join_leave=True),
         "user": NamespacePolicy(join="owner", publish="none")},
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, "true"), (8888, "8888"), (0.5, "0.5"), ("a\"b\\", '"a\\"b\\\\"'),
     (("HS256", "HS384"), '["HS256", "HS384"]'), ((), "[]")],
)
def test_toml_values(value: object, expected: str) -> None:
    assert toml_value(value) == expected
    assert tomllib.loads(f"x = {expected}")["x"] == (list(value) if isinstance(value, tuple)
                                                     else value)
