"""Where log lines go and how they look: ``--log-format``, ``--log-config``.

``text`` (the default) is one line per record, ``TIME LEVEL LOGGER: MESSAGE``.
``json`` is one JSON object per line for log shippers (Loki, ELK, Datadog):
``ts``, ``level``, ``logger``, ``msg``, and the line's fields as keys. A
field is a ``key=%s`` pair of the message's format ("open user=%s addr=%s"
gives ``user`` and ``addr``, with the argument's own type: ``code`` is a
number), or a value passed with ``extra=``. Fields carry exactly what the
text line shows, already escaped and redacted at the call (see
:mod:`wsserver.logsafe`), so JSON adds no secret; the output is ASCII, so
any client text (a lone surrogate, a control character) stays valid JSON.

``--log-config FILE`` hands the whole set-up to the standard library, as
uvicorn's flag does: a ``.json`` or ``.toml`` file is a
:func:`logging.config.dictConfig` dictionary, any other file an INI file for
:func:`logging.config.fileConfig`. The file then decides handlers, formats
and levels (``--log-level`` and ``--log-format`` are not applied); existing
loggers stay enabled unless the file says ``disable_existing_loggers``.
"""

from __future__ import annotations

import functools
import json
import logging
import logging.config
import re
import sys
import time
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wsserver.errors import ConfigError

#: ``--log-format`` values.
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The keys every JSON line has; a field of the same name does not replace them.
RESERVED = ("ts", "level", "logger", "msg")

#: One %-conversion of a format string: %(name)s, %-8.3f, %*d, %r, %%...
_CONVERSION = re.compile(
    r"%(?:\((?P<name>[^)]*)\))?[#0\- +]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d+))?"
    r"[hlL]?(?P<type>[diouxXeEfFgGcrsa%])"
)
#: A field name right before a conversion: "user=%s".
_KEY_BEFORE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=$")
#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


def message_fields(msg: object, args: object) -> dict[str, Any]:
    """The ``key=%x`` pairs of a log call's format ``msg``, with their arguments.

    Numbers and strings keep their type; other values become the text the
    conversion would have written. A format that does not match its
    arguments yields no fields (the message itself still shows them).
    """
    if not isinstance(msg, str) or "=%" not in msg or not args:
        return {}
    plan = _fields_of(msg)
    fields: dict[str, Any] = {}
    for key, index, name, conversion in plan:
        if name is not None:
            # Mapping style, "%(user)s": the argument is the mapping's value.
            value = args.get(name) if isinstance(args, Mapping) else None
        elif isinstance(args, tuple) and index < len(args):
            value = args[index]
        else:
            return {}
        fields[key] = _json_value(value, conversion)
    return fields


@functools.lru_cache(maxsize=512)
def _fields_of(msg: str) -> tuple[tuple[str, int, str | None, str], ...]:
    """(key, argument index, mapping name, conversion) of each ``key=%x`` in ``msg``.

    Worked out once per format string: log calls use a handful of constant ones.
    """
    plan = []
    position = 0
    for match in _CONVERSION.finditer(msg):
        conversion = match.group("type")
        if conversion == "%":
            continue
        name = match.group("name")
        index = position
        if name is None:
            # A "*" width or precision takes an argument of its own first.
            index += (match.group("width") == "*") + (match.group("precision") == "*")
            position = index + 1
        key = _KEY_BEFORE.search(msg, 0, match.start())
        if key is not None and key.group(1) not in RESERVED:
            plan.append((key.group(1), index, name, conversion))
    return tuple(plan)


#: Values a JSON line carries as they are.
_JSON_SCALARS = (bool, int, float, str)


def _json_value(value: object, conversion: str) -> Any:
    if value is None or isinstance(value, _JSON_SCALARS):
        return value
    return repr(value) if conversion == "r" else str(value)


class TextFormatter(logging.Formatter):
    """The standard formatter, with ``asctime``'s date and time worked out once
    a second instead of once a line (``localtime`` and ``strftime`` were a
    third of a connection's "open" line), and :data:`TEXT_FORMAT` filled in
    without a ``%`` operation over the record's dictionary. The text is the same."""

    def __init__(self, fmt: str | None = TEXT_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)
        self._second = -1
        self._stamp = ""
        self._uses_time = super().usesTime()
        self._text_format = fmt == TEXT_FORMAT

    def usesTime(self) -> bool:
        return self._uses_time

    def formatMessage(self, record: logging.LogRecord) -> str:
        if self._text_format:
            return f"{record.asctime} {record.levelname} {record.name}: {record.message}"
        return super().formatMessage(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None or self.default_msec_format is None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            # Time zones are whole minutes away from UTC: a second starts at
            # the same instant in local time.
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return self.default_msec_format % (self._stamp, record.msecs)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601), ``level``, ``logger``,
    ``msg``, the line's fields, and ``exc`` with a traceback.

    Usable from a ``--log-config`` file too: ``"()": "wsserver.logconfig.JsonFormatter"``
    (dictConfig) or ``class=wsserver.logconfig.JsonFormatter`` (fileConfig).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in message_fields(record.msg, record.args).items():
            entry.setdefault(key, value)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                entry.setdefault(key, _json_value(value, "s"))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII: a lone surrogate or any control character is a \u escape.
        return json.dumps(entry, ensure_ascii=True, default=str)


def configure(log_format: str, level: str, config_file: str | None = None) -> None:
    """Set up the root logger: from ``config_file``, else ``log_format`` on stderr.

    Raises:
        ConfigError: the file cannot be read or is not a logging configuration.
    """
    if config_file:
        apply_config_file(config_file)
        return
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def apply_config_file(path: str) -> None:
    """Configure logging from ``path`` (dictConfig for .json/.toml, else fileConfig).

    Raises:
        ConfigError: naming ``--log-config`` and what is wrong.
    """
    suffix = Path(path).suffix.lower()
    try:
        if suffix in (".json", ".toml"):
            with open(path, "rb") as handle:
                config = json.load(handle) if suffix == ".json" else tomllib.load(handle)
            if not isinstance(config, dict):
                raise ValueError("the file must hold one object (a dictConfig dictionary)")
            # dictConfig's own default (True) would silence every logger the
            # server created at import, all of wsserver's among them.
            config.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(config)
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except OSError as exc:
        raise ConfigError([f"--log-config {path}: cannot read: {exc.strerror or exc}"]) from None
    except Exception as exc:
        # json/toml syntax, and dictConfig/fileConfig's ValueError, KeyError...
        kind = "dictConfig (JSON or TOML)" if suffix in (".json", ".toml") else "fileConfig (INI)"
        raise ConfigError(
            [f"--log-config {path}: not a logging {kind} configuration: "
             f"{type(exc).__name__}: {exc}"]
        ) from None
