"""--log-format json and --log-config: the formatter and the file loader, no sockets."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from wsserver.errors import ConfigError
from wsserver.logconfig import (
    TEXT_FORMAT,
    JsonFormatter,
    TextFormatter,
    apply_config_file,
    message_fields,
)


@pytest.mark.parametrize(
    ("msg", "args", "expected"),
    [
        ("open user=%s addr=%s via=%s", ("alice", "10.0.0.1", "header"),
         {"user": "alice", "addr": "10.0.0.1", "via": "header"}),
        ("close user=%s addr=%s code=%d by=%s reason=%r detail=%r duration=%.3fs",
         ("bob", "::1", 4001, "server", "invalid token", "x", 0.25),
         {"user": "bob", "addr": "::1", "code": 4001, "by": "server",
          "reason": "invalid token", "detail": "x", "duration": 0.25}),
        ("handshake refused: %s (%d) addr=%s", ("no token", 403, "1.2.3.4"), {"addr": "1.2.3.4"}),
        ("%d%% done width=%*d", (50, 4, 7), {"width": 7}),
        ("user=%(user)s", {"user": "carol"}, {"user": "carol"}),
        ("no fields %s", ("x",), {}),
        ("a=%s b=%s", ("too few",), {}),  # a broken call: the message says so, no fields
        ("msg=%s level=%s", ("m", "l"), {}),  # reserved keys are never replaced
        ("thing=%s other=%r", (Path("/p"), Path("/q")),
         {"thing": "/p", "other": repr(Path("/q"))}),
    ],
)
def test_message_fields(msg: str, args: Any, expected: dict[str, Any]) -> None:
    assert message_fields(msg, args) == expected


def record(msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("wsserver.connection", logging.INFO, __file__, 1, msg, args, None)
    made.__dict__.update(extra)
    return made


def test_a_json_line_has_the_four_keys_and_the_fields() -> None:
    line = JsonFormatter().format(record("close user=%s code=%d", "alice", 1000, status=7))
    entry = json.loads(line)
    assert entry["level"] == "INFO" and entry["logger"] == "wsserver.connection"
    assert entry["msg"] == "close user=alice code=1000"
    assert (entry["user"], entry["code"], entry["status"]) == ("alice", 1000, 7)
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    assert "\n" not in line


@pytest.mark.parametrize(
    "text",
    ["a\nb", "\ud800", "Zoë\u2028😀", '"}{"level": "ERROR', "\x1b[31m\x00", "\\"],
)
def test_any_client_text_stays_one_valid_line(text: str) -> None:
    line = JsonFormatter().format(record("open user=%s", text))
    assert line.isascii() and "\n" not in line
    assert json.loads(line)["user"] == text
    line.encode("utf-8")  # never a lone surrogate on the wire


def test_an_exception_is_one_field_of_the_same_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        import sys

        made.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(made))
    assert "ValueError: boom" in entry["exc"]


@pytest.fixture
def restore_logging() -> Any:
    """dictConfig and fileConfig change the process's loggers: put them back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


DICT_CONFIG = {
    "version": 1,
    "formatters": {"json": {"()": "wsserver.logconfig.JsonFormatter"}},
    "handlers": {"file": {"class": "logging.FileHandler", "filename": "FILE",
                          "formatter": "json"}},
    "root": {"level": "INFO", "handlers": ["file"]},
}


@pytest.mark.parametrize("suffix", [".json", ".toml", ".ini"])
def test_a_log_config_file_sets_up_logging_and_keeps_existing_loggers(
    tmp_path: Path, suffix: str, restore_logging: None
) -> None:
    existing = logging.getLogger("wsserver.connection")  # made at import, before the file
    out = tmp_path / "out.log"
    config = tmp_path / f"logging{suffix}"
    if suffix == ".json":
        config.write_text(json.dumps(DICT_CONFIG).replace("FILE", str(out)))
    elif suffix == ".toml":
        config.write_text(
            'version = 1\n[formatters.json]\n"()" = "wsserver.logconfig.JsonFormatter"\n'
            f'[handlers.file]\nclass = "logging.FileHandler"\nfilename = "{out}"\n'
            'formatter = "json"\n[root]\nlevel = "INFO"\nhandlers = ["file"]\n'
        )
    else:
        config.write_text(
            "[loggers]\nkeys=root\n[handlers]\nkeys=file\n[formatters]\nkeys=json\n"
            "[logger_root]\nlevel=INFO\nhandlers=file\n"
            f"[handler_file]\nclass=FileHandler\nformatter=json\nargs=({str(out)!r},)\n"
            "[formatter_json]\nclass=wsserver.logconfig.JsonFormatter\n"
        )
    apply_config_file(str(config))
    existing.info("open user=%s", "alice")
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert json.loads(out.read_text().splitlines()[-1])["user"] == "alice"


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("bad.json", "{not json", "not a logging dictConfig"),
        ("list.json", "[1]", "one object"),
        ("bad.toml", "version = 1\n[handlers.x]\nclass = 'no.such.Handler'\n", "dictConfig"),
        ("bad.ini", "[loggers]\nkeys=root\n", "fileConfig (INI)"),
        ("missing.json", None, "cannot read"),
    ],
)
def test_a_bad_log_config_is_one_config_error_naming_the_flag(
    tmp_path: Path, name: str, text: str | None, words: str, restore_logging: None
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        apply_config_file(str(path))
    (problem,) = caught.value.problems
    assert problem.startswith(f"--log-config {path}") and words in problem


def test_the_text_line_is_the_standard_formatters_across_seconds() -> None:
    ours, standard = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    # Within one second, at its last millisecond and across the next ones
    # (the date part is worked out once a second).
    for created in (1_000_000_000.0, 1_000_000_000.5, 1_000_000_000.9995, 1_000_000_001.0,
                    1_000_000_001.25, 1_000_086_400.0, 999_999_999.999):
        record = logging.LogRecord("wsserver.connection", logging.INFO, __file__, 1,
                                   "open user=%s", ("alice",), None)
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        assert ours.format(record) == standard.format(record)
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("wsserver", logging.ERROR, __file__, 1, "failed: %d", (7,),
                                   sys.exc_info())
    assert ours.format(failed) == standard.format(failed)
    assert "ValueError: boom" in ours.format(failed)
