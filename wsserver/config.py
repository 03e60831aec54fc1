"""Settings: one object built from defaults < config file < environment < flags.

Every option is declared once, as a field of :class:`Settings` made by
:func:`option`: its type, default, parser and help. :data:`OPTIONS` is read
off those fields, and the argument parser, the ``WSSERVER_*`` environment
variables and the TOML config file are all derived from it, so the three
sources (and the defaults) cannot drift apart. The room policy is the
exception: a nested table, it comes only from the file's ``[rooms]`` (parsed
by :meth:`wsserver.rooms.RoomPolicy.from_table`). :func:`load_settings`
collects every problem it finds and raises one :class:`ConfigError` listing
them all, before anything is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import ipaddress
import os
import secrets
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from wsserver.brokers.redis_urls import check_url, redact_url
from wsserver.errors import ConfigError
from wsserver.logconfig import LOG_FORMATS
from wsserver.origin import origin_problem
from wsserver.rooms import RoomPolicy

ENV_PREFIX = "WSSERVER_"

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
#: RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
MIN_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
#: ``--loop`` values, as uvicorn names them.
LOOPS = ("auto", "asyncio", "uvloop")
#: Demo tokens are for trying the server out: an hour is plenty.
MAX_DEMO_TOKEN_TTL = 3600


class Secret:
    """A string that does not show itself in ``repr``, ``str`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value itself; call only where the key is used."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(type(self))


def _int(text: str) -> int:
    # int()'s own message ("invalid literal for int() with base 10") reads as Python.
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("not a whole number") from None


def _float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError("not a number") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a finite number above 0")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a finite number, 0 or more")
    return value


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0..65535")
    return value


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be true or false")


def _on_off(text: str) -> str:
    lowered = text.strip().lower()
    if lowered not in {"on", "off"}:
        raise ValueError("must be on or off")
    return lowered


#: Public name of the boolean parser, so the CLI can tell which flags take --no-.
bool_parser = _bool


def _secret(text: str) -> Secret:
    return Secret(text)


def _text(text: str) -> str:
    return text


def _broker(text: str) -> str:
    if text == "memory":
        return text
    return check_url(text)


def _http_url(text: str) -> str:
    """An ``http://`` or ``https://`` URL with a host (a backend's endpoint)."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("use an http:// or https:// URL with a host")
    return text.strip()


def _header_names(text: str) -> tuple[str, ...]:
    names = _csv(text)
    for name in names:
        # RFC 9110 section 5.6.2: a field name is a token.
        if not all(ch.isalnum() or ch in "!#$%&'*+-.^_`|~" for ch in name) or not name.isascii():
            raise ValueError(f"{name!r} is not an HTTP header name")
    return names


def _log_format(text: str) -> str:
    lowered = text.strip().lower()
    if lowered not in LOG_FORMATS:
        raise ValueError("use text or json")
    return lowered


def _node_name(text: str) -> str:
    if not text or "\0" in text or len(text) > 128 or not text.isprintable():
        raise ValueError("1 to 128 printable characters")
    return text


@dataclass(frozen=True)
class Option:
    """One setting as flags, environment and file see it (read off a Settings field)."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


#: The key of an option field's metadata that holds its declaration.
_OPTION = "wsserver.option"

_T = TypeVar("_T")


def option(
    default: _T | None,
    parse: Callable[[str], _T],
    help: str,
    metavar: str | None = None,
    *,
    repr: bool = True,
) -> _T:
    """Declare a :class:`Settings` field as an option: flag, variable and TOML key.

    ``default`` None means unset: :func:`load_settings` works the value out
    (the help says how) or leaves None. The field gets no dataclass default,
    so this is the one place the default is written. Typed ``_T`` so mypy
    checks ``parse`` returns what the field's annotation says.
    """
    declaration = {"parse": parse, "default": default, "help": help, "metavar": metavar}
    return cast(_T, field(repr=repr, metadata={_OPTION: declaration}))


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Validated configuration, built once and handed down explicitly.

    Built only by :func:`load_settings`: the option fields have no dataclass
    default (their default is in their :func:`option`), so a Settings that
    skipped validation cannot be made by accident. ``demo_mode`` is true
    when no JWT key was configured: the server then signs with an ephemeral
    secret, serves only on loopback and enables the demo token endpoint.
    """

    host: str = option("127.0.0.1", _text, "listen address")
    port: int = option(8888, _port, "listen port (0 picks a free one)")
    jwt_secret: Secret | None = option(
        None, _secret, "HMAC key for HS256/384/512 (prefer --jwt-secret-file)",
    )
    jwt_secret_file: str | None = option(None, _text, "file holding the HMAC key", "FILE")
    jwt_public_key_file: str | None = option(
        None, _text, "PEM public key for RS*/PS*/ES*/EdDSA", "FILE",
    )
    jwt_algorithms: tuple[str, ...] = option(
        ("HS256",), _csv, "comma list of accepted algorithms; never 'none'",
    )
    jwt_audience: str | None = option(None, _text, "when set, tokens must carry this 'aud'")
    jwt_issuer: str | None = option(None, _text, "when set, tokens must carry this 'iss'")
    jwt_leeway: float = option(
        10.0, _non_negative_float, "seconds of clock skew allowed on exp/nbf/iat",
    )
    jwt_typ: str | None = option(
        None, _text, "when set, the token header 'typ' must equal it (RFC 8725 explicit typing)",
    )
    max_token_lifetime: float | None = option(
        None, _positive_float,
        "when set, tokens must carry 'iat' and exp - iat may not exceed it (seconds)",
    )
    allowed_origins: tuple[str, ...] = option(
        None, _csv, "comma list of origins allowed to connect (exact, or https://*.example.com)",
    )
    max_connections: int = option(1000, _positive_int, "open connections, whole server")
    max_connections_per_user: int = option(10, _positive_int, "open connections per JWT 'sub'")
    max_connections_per_ip: int = option(100, _positive_int, "open connections per client address")
    max_unverified_connections: int = option(
        64, _positive_int,
        "upgraded connections whose token failed, waiting for their 4001 close; counted apart "
        "from --max-connections",
    )
    message_rate: float = option(10.0, _positive_float, "per-user messages per second")
    message_burst: int = option(20, _positive_int, "per-user bucket size")
    rate_limit_strikes: int = option(
        10, _positive_int,
        "messages sent while rate limited before the connection is closed with 4029",
    )
    handshake_rate: float = option(20.0, _positive_float, "per-address new connections per second")
    handshake_burst: int = option(30, _positive_int, "per-address handshake bucket size")
    max_message_size: int = option(65536, _positive_int, "bytes; larger messages close with 1009")
    frame_rate: float = option(
        200.0, _positive_float,
        "frames per second per connection, pings and fragments included; a flood closes with "
        "1008 (never below 2 x --message-rate)",
    )
    frame_burst: int = option(
        400, _positive_int, "per-connection frame bucket size (never below 2 x --message-burst)",
    )
    fragment_timeout: float = option(
        10.0, _positive_float,
        "seconds a fragmented message may stay unfinished before closing with 1008",
    )
    compression: str = option(
        "on", _on_off,
        "permessage-deflate (RFC 7692) when the client offers it: on or off", "on|off",
    )
    compression_threshold: int = option(
        256, _non_negative_int,
        "bytes; shorter messages go uncompressed on compressing connections",
    )
    max_write_buffer: int = option(
        1024 * 1024, _positive_int,
        "bytes of unsent data per connection: past it a room's messages wait and are sent "
        "from the history once it drains (the member lags); replies may use as much again "
        "before the connection is closed as a slow consumer (4009)",
    )
    slow_consumer_timeout: float = option(
        30.0, _non_negative_float,
        "seconds a connection may read nothing of its backlog before it is closed as a slow "
        "consumer (4009; 0: never)",
    )
    task_workers: int = option(
        None, _positive_int, "processes in the CPU task pool (default: CPUs)",
    )
    task_queue: int = option(
        None, _positive_int, "tasks waiting or running at once (default: 4 x workers)",
    )
    task_timeout: float = option(
        30.0, _positive_float, "seconds before a task is answered 'timeout'",
    )
    task_per_connection: int = option(2, _positive_int, "tasks in flight per connection")
    task_per_user: int = option(
        4, _positive_int, "tasks in flight per user, across all of that user's connections",
    )
    tasks_module: str | None = option(
        None, _text, "module imported at start to register more tasks", "MODULE",
    )
    monitor_interval: float = option(
        10.0, _positive_float, "seconds between connection-count checks",
    )
    ping_interval: float = option(
        20.0, _non_negative_float, "seconds between keepalive pings (0: off)",
    )
    token_warning: float = option(
        60.0, _non_negative_float, "seconds before 'exp' to send token_expiring",
    )
    drain_timeout: float = option(
        10.0, _non_negative_float, "seconds to wait for connections to close on shutdown",
    )
    drain_rate: float | None = option(
        None, _positive_float,
        "on shutdown, close connections with 1012 at this many per second (for the whole "
        "machine under --workers) instead of all at once with 1001",
    )
    header_timeout: float = option(
        10.0, _positive_float, "seconds a client has to send its request headers",
    )
    max_header_size: int = option(16384, _positive_int, "bytes of HTTP request headers accepted")
    certfile: str | None = option(
        None, _text, "TLS certificate chain (PEM) to serve wss://", "FILE",
    )
    keyfile: str | None = option(None, _text, "TLS private key (PEM)", "FILE")
    trusted_proxies: tuple[str, ...] = option(
        (), _csv, "comma list of proxy addresses/CIDRs whose X-Forwarded-For is believed",
    )
    demo: bool = option(None, _bool, "enable POST /auth/demo-token (on in demo mode)")
    demo_token_ttl: int = option(
        900, _positive_int, f"lifetime in seconds of demo tokens (at most {MAX_DEMO_TOKEN_TTL})",
    )
    access_log: bool = option(
        True, _bool, "one INFO line per HTTP request; probes, polls and upgrades only at DEBUG",
    )
    log_level: str = option("INFO", _text, "DEBUG, INFO, WARNING or ERROR")
    log_format: str = option(
        "text", _log_format,
        "text, or json: one object per line with ts, level, logger, msg and the line's fields",
    )
    log_config: str | None = option(
        None, _text,
        "logging configuration file: .json or .toml for dictConfig, else INI for fileConfig; "
        "it then decides handlers, formats and levels (--log-level, --log-format unused)",
        "FILE",
    )
    loop: str = option(
        "auto", _text, "event loop: auto (uvloop when installed), asyncio or uvloop",
    )
    api_key: Secret | None = option(
        None, _secret, "server API key, at least 32 bytes (prefer --api-key-file)", repr=False,
    )
    api_key_file: str | None = option(None, _text, "file holding the server API key", "FILE")
    internal_port: int | None = option(
        None, _port, "serve /metrics, /stats and /api/ on this port only (off the public one)",
    )
    internal_host: str = option("127.0.0.1", _text, "address of the --internal-port listener")
    room_publish_rate: float = option(
        50.0, _positive_float,
        "client publishes per second into one room (every member receives each one)",
    )
    room_publish_burst: int = option(100, _positive_int, "per-room publish bucket size")
    room_publish_bytes: int = option(
        1024 * 1024, _non_negative_int,
        "bytes per second of client publishes into one room, burst twice that (0: no byte "
        "limit); what every member's link must carry",
    )
    max_room_members: int = option(10000, _positive_int, "connections in one room on one node")
    max_recovery: int = option(
        300, _positive_int, "messages at most recovered on a join with 'since'",
    )
    max_recovery_bytes: int = option(
        4 * 1024 * 1024, _positive_int,
        "bytes at most recovered on a join with 'since' (beyond: recovered false)",
    )
    #: Not in repr: a Redis URL may hold a password.
    broker: str = option(
        "memory", _broker,
        "'memory' (this process only) or a Redis URL shared by every node "
        "(redis://host:port/db, rediss://..., unix:///path, "
        "redis+sentinel://host:port,host:port/MASTER/db)",
        "URL", repr=False,
    )
    workers: int = option(
        1, _positive_int,
        "processes serving the same port on this machine; more than 1 needs a Redis broker",
    )
    worker_timeout: float = option(
        30.0, _positive_float,
        "seconds a worker's event loop may go without a heartbeat before the supervisor "
        "kills and replaces it (--workers above 1)",
    )
    node_name: str = option(
        None, _node_name,
        "this node in /api/nodes, logs and metrics (default: host name and pid)",
        "NAME",
    )
    broker_probe_interval: float = option(
        2.0, _positive_float, "seconds between readiness probes through the broker",
    )
    broker_heartbeat: float = option(
        5.0, _positive_float,
        "seconds between this node's heartbeats through a Redis broker (rarely changed)",
    )
    broker_node_ttl: float = option(
        15.0, _positive_float,
        "seconds without a heartbeat after which a node counts as dead and its users leave "
        "presence (at least twice --broker-heartbeat; the two add up to at most 60)",
    )
    #: The proxy and JWKS URLs are not in repr: a URL may hold credentials.
    proxy_connect_url: str | None = option(
        None, _http_url,
        "POST here to authenticate connections that carry no JWT (cookies, sessions); "
        "see docs/backend.md",
        "URL", repr=False,
    )
    proxy_subscribe_url: str | None = option(
        None, _http_url, "POST here to decide joins in namespaces with join = \"proxy\"", "URL",
        repr=False,
    )
    proxy_publish_url: str | None = option(
        None, _http_url,
        "POST here to decide (and possibly rewrite) publishes in namespaces with "
        "publish = \"proxy\"",
        "URL", repr=False,
    )
    proxy_rpc_url: str | None = option(
        None, _http_url, "POST here the client's rpc messages; the answer goes back as rpc_result",
        "URL", repr=False,
    )
    proxy_headers: tuple[str, ...] = option(
        ("Cookie", "Authorization"), _header_names,
        "comma list of handshake headers passed to the connect proxy (never logged)",
    )
    proxy_key_file: str | None = option(
        None, _text,
        "file holding the key sent as X-Wsserver-Proxy-Key on every proxy call (32+ bytes)",
        "FILE",
    )
    proxy_timeout: float = option(
        3.0, _positive_float, "seconds a proxy call may take before the client gets unavailable",
    )
    proxy_max_concurrency: int = option(
        64, _positive_int,
        "proxy calls in flight at once per kind (connect, subscribe, publish, rpc); beyond it "
        "the client gets unavailable at once",
    )
    jwt_jwks_url: str | None = option(
        None, _http_url,
        "verify tokens against this JSON Web Key Set (keys chosen by 'kid'); instead of a key "
        "file",
        "URL", repr=False,
    )
    jwks_refresh_min: float = option(
        30.0, _positive_float,
        "seconds at least between two fetches of the JWKS (an unknown 'kid' triggers one)",
    )
    demo_mode: bool = False
    #: True when the allowed origins are demo mode's loopback defaults.
    default_origins: bool = False
    #: The key that verifies tokens: HMAC secret or PEM public key text.
    verify_key: Secret | None = field(default=None, repr=False)
    #: Who may join and publish where: the config file's ``[rooms]`` table only
    #: (no flag or environment variable); demo mode opens the default namespace
    #: unless the file has a ``[rooms]`` table.
    rooms: RoomPolicy = field(default_factory=RoomPolicy)
    #: True when ``rooms`` came from the config file's ``[rooms]`` table.
    rooms_from_file: bool = False
    #: The key sent as ``X-Wsserver-Proxy-Key``, read from ``--proxy-key-file``.
    proxy_key: Secret | None = field(default=None, repr=False)

    @property
    def proxy_urls(self) -> dict[str, str]:
        """The configured proxies, by kind (``connect``, ``subscribe``, ``publish``, ``rpc``)."""
        urls = {"connect": self.proxy_connect_url, "subscribe": self.proxy_subscribe_url,
                "publish": self.proxy_publish_url, "rpc": self.proxy_rpc_url}
        return {kind: url for kind, url in urls.items() if url}

    @property
    def scheme(self) -> str:
        return "https" if self.certfile else "http"

    @property
    def can_sign(self) -> bool:
        """True when the configured key can also issue tokens (an HMAC key)."""
        return self.verify_key is not None and all(
            alg in HMAC_ALGORITHMS for alg in self.jwt_algorithms
        )

    @property
    def frame_budget(self) -> tuple[float, int]:
        """(rate, burst) of each connection's frame bucket.

        Never below twice the message budget, so a client within its message
        rate (plus a pong now and then) never meets the frame limit first.
        """
        return (
            max(self.frame_rate, 2 * self.message_rate),
            max(self.frame_burst, 2 * self.message_burst),
        )

    def loopback_origins(self, port: int) -> tuple[str, ...]:
        """Demo mode's allowed origins: this server's own loopback page."""
        return (f"{self.scheme}://127.0.0.1:{port}", f"{self.scheme}://localhost:{port}")

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (for tests and the demo mode)."""
        return dataclasses.replace(self, **changes)


OPTIONS: tuple[Option, ...] = tuple(
    Option(name=settings_field.name, **settings_field.metadata[_OPTION])
    for settings_field in dataclasses.fields(Settings)
    if _OPTION in settings_field.metadata
)

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


def add_arguments(
    parser: argparse.ArgumentParser,
    only: Sequence[str] | None = None,
    helps: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per option (or per option named in ``only``); unset flags stay
    absent so precedence works. ``helps`` replaces the help of the options it
    names (what a flag means to a command that is not the server)."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML config file (keys as the flags, without '--')")
    for option in OPTIONS:
        if only is not None and option.name not in only:
            continue
        kwargs: dict[str, Any] = {"dest": option.name, "default": argparse.SUPPRESS}
        if option.parse is _bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = option.metavar or option.name.upper()
        default = option.default
        if isinstance(default, tuple):
            default = ",".join(default) or "none"
        suffix = f" (default: {default})" if default is not None else ""
        text = (helps or {}).get(option.name, option.help)
        parser.add_argument(option.flag, help=text + suffix, **kwargs)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    check_files: bool = True,
) -> Settings:
    """Build and validate :class:`Settings` from flags, environment and file.

    Args:
        flags: values given on the command line, as raw strings (or booleans)
            keyed by option name, plus ``config`` for the file path.
        environ: the process environment (``os.environ`` when None).
        check_files: read key and certificate files (off only in unit tests).

    Raises:
        ConfigError: listing every problem found, one line each.
    """
    problems: list[str] = []
    # Where each value came from, so a problem names the flag, variable or file key to fix.
    sources: dict[str, str] = {}
    values = _collect(flags, environ, problems, sources)
    return _build(values, problems, sources, check_files=check_files)


def load_options(
    names: Sequence[str],
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Only the options in ``names``, from the same sources and with the same
    precedence as :func:`load_settings`, defaults filled in; for a command that
    is a client of a server (``publish``), not the server: the server's own
    checks (demo mode on loopback, keys, origins) do not apply, and settings
    it does not read are not looked at.

    Raises:
        ConfigError: a value of one of ``names`` does not parse.
    """
    problems: list[str] = []
    values = _collect(flags, environ, problems, {}, only=frozenset(names))
    if problems:
        raise ConfigError(problems)
    return {name: values.get(name, OPTIONS_BY_NAME[name].default) for name in names}


def _collect(
    flags: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None,
    problems: list[str],
    sources: dict[str, str],
    only: frozenset[str] | None = None,
) -> dict[str, Any]:
    """The parsed values of file, environment and flags, later ones winning.

    With ``only``, every other setting is skipped unread (unknown ones too).
    """
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}

    config_path = flags.pop("config", None)
    config_source = "--config"
    if not config_path and environ.get(ENV_PREFIX + "CONFIG"):
        config_path, config_source = environ[ENV_PREFIX + "CONFIG"], ENV_PREFIX + "CONFIG"
    if config_path:
        values.update(_read_config_file(config_path, config_source, problems, sources, only))

    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX):].lower()
        if only is not None and name not in only:
            continue
        option = OPTIONS_BY_NAME.get(name)
        if option is None:
            problems.append(f"{key}: unknown setting")
            continue
        _parse_into(values, option, raw, key, problems)
        sources[name] = key

    for name, raw in flags.items():
        option = OPTIONS_BY_NAME.get(name)
        if option is None or (only is not None and name not in only):
            continue
        if isinstance(raw, bool) or not isinstance(raw, str):
            values[name] = raw
        else:
            _parse_into(values, option, raw, option.flag, problems)
        sources[name] = option.flag
    return values


def api_key_of(values: Mapping[str, Any]) -> Secret | None:
    """The server API key that ``values`` (``api_key``, ``api_key_file``) give, read
    and checked as the server does.

    Raises:
        ConfigError: both given, the file unreadable, or the key too short.
    """
    problems: list[str] = []
    key = _load_api_key(dict(values), problems, check_files=True)
    if problems:
        raise ConfigError(problems)
    return key


def _parse_into(
    values: dict[str, Any], option: Option, raw: str, source: str, problems: list[str]
) -> None:
    try:
        values[option.name] = option.parse(raw)
    except ValueError as exc:
        if option.parse is _secret:
            shown = "<hidden>"
        elif option.parse is _broker:
            # A Redis URL may carry a password.
            shown = repr(redact_url(raw))
        else:
            shown = repr(raw)
        problems.append(f"{source}: invalid value {shown}: {exc}")


def _read_config_file(
    path: str,
    given_by: str,
    problems: list[str],
    sources: dict[str, str],
    only: frozenset[str] | None = None,
) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        problems.append(f"{given_by} {path}: cannot read: {exc.strerror}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        # The file is at fault, not the flag that named it.
        problems.append(f"{path}: not valid TOML: {exc}")
        return {}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        name = key.replace("-", "_")
        if only is not None and name not in only:
            continue
        option = OPTIONS_BY_NAME.get(name)
        source = f"{path}: {key}"
        if key == "rooms":
            try:
                values["rooms"] = RoomPolicy.from_table(raw)
            except ConfigError as error:
                problems.extend(f"{path}: {problem}" for problem in error.problems)
            continue
        if option is None:
            problems.append(f"{source}: unknown setting")
            continue
        sources[name] = source
        if isinstance(raw, dict):
            problems.append(f"{source}: expected a value, not a table")
            continue
        if isinstance(raw, list):
            raw = ",".join(str(item) for item in raw)
        elif isinstance(raw, bool):
            if option.parse is not _bool:
                problems.append(f"{source}: expected {option.name}, not a boolean")
                continue
            values[name] = raw
            continue
        _parse_into(values, option, str(raw), source, problems)
    return values


def _build(
    values: dict[str, Any], problems: list[str], sources: dict[str, str], *, check_files: bool
) -> Settings:
    """The Settings from the merged values, each step appending what it finds wrong."""
    defaults = {option.name: option.default for option in OPTIONS}
    rooms: RoomPolicy | None = values.pop("rooms", None)
    merged = {**defaults, **values}

    def where(name: str) -> str:
        """The flag, variable or file key that set ``name`` (its flag when defaulted)."""
        return sources.get(name) or OPTIONS_BY_NAME[name].flag

    _size_task_pool(merged)
    verify_key, demo_mode, known = _keys_and_demo_mode(merged, problems, where, sources,
                                                       check_files=check_files)
    _check_demo_endpoint(merged, problems, where, demo_mode, known)
    _check_origins_and_proxies(merged, problems, where, demo_mode)
    _check_files_and_logging(merged, problems, where, check_files=check_files)
    merged["api_key"] = _load_api_key(merged, problems, check_files=check_files)
    proxy_key = _load_proxy_key(merged, problems, check_files=check_files)
    _check_cluster(merged, problems, where)
    # A [rooms] table wins even in demo mode: trying a real policy locally,
    # without a key, must show that policy, not the demo's open rooms.
    merged["rooms_from_file"] = rooms is not None
    if rooms is None:
        rooms = RoomPolicy.demo() if demo_mode else RoomPolicy()
    merged["rooms"] = rooms
    problems.extend(_proxy_policy_problems(rooms, merged))

    if problems:
        raise ConfigError(problems)
    return Settings(**merged, demo_mode=demo_mode, verify_key=verify_key, proxy_key=proxy_key)


Where = Callable[[str], str]


def _size_task_pool(merged: dict[str, Any]) -> None:
    """Task workers and queue: with --workers N, each server process gets its share
    of the CPUs, so N processes do not start N x CPUs task workers by default."""
    workers = merged["task_workers"] or max(1, (os.cpu_count() or 1) // merged["workers"])
    merged["task_workers"] = workers
    merged["task_queue"] = merged["task_queue"] or 4 * workers


def _keys_and_demo_mode(
    merged: dict[str, Any], problems: list[str], where: Where, sources: Mapping[str, str],
    *, check_files: bool,
) -> tuple[Secret | None, bool, tuple[str, ...]]:
    """The key that verifies tokens, whether the server runs in demo mode, and the
    configured algorithms that exist (a typo is reported here, once)."""
    algorithms = tuple(merged["jwt_algorithms"])
    merged["jwt_algorithms"] = algorithms
    _check_algorithms(algorithms, where("jwt_algorithms"), problems)
    # Later checks look only at real algorithms: 'none' or a typo is reported once, above.
    known = tuple(alg for alg in algorithms if alg in HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS)

    if merged["jwt_jwks_url"] and "jwt_algorithms" not in sources:
        # Identity providers sign with RS256 unless told otherwise (Keycloak, Auth0,
        # Okta, Azure AD); HS256, the default beside a secret, never comes from a JWKS.
        known = merged["jwt_algorithms"] = ("RS256",)
    verify_key = _load_key(merged, known, problems, where, check_files=check_files)
    # A JWKS URL or a connect proxy authenticates connections too: no demo mode.
    demo_mode = verify_key is None and not any(
        merged[name] for name in ("jwt_secret", "jwt_secret_file", "jwt_public_key_file",
                                  "jwt_jwks_url", "proxy_connect_url")
    )
    if demo_mode:
        if not _is_loopback(merged["host"]):
            problems.append(
                f"{where('host')} {merged['host']}: not a loopback address; demo mode (no JWT key) "
                "serves only on 127.0.0.1, ::1 or localhost. Configure --jwt-secret-file "
                "or --jwt-public-key-file to serve on other addresses"
            )
        if any(alg not in HMAC_ALGORITHMS for alg in known):
            problems.append(
                f"{where('jwt_algorithms')}: demo mode signs with HS256; give a key for others"
            )
        verify_key = Secret(secrets.token_urlsafe(48))
        merged["jwt_algorithms"] = ("HS256",)
        if merged["demo"] is None:
            merged["demo"] = True
    return verify_key, demo_mode, known


def _check_demo_endpoint(
    merged: dict[str, Any], problems: list[str], where: Where, demo_mode: bool,
    known: tuple[str, ...],
) -> None:
    """``--demo`` beside a real key, the demo token TTL, ``--jwt-typ``."""
    merged["demo"] = bool(merged["demo"])
    if merged["demo"] and not demo_mode and not all(a in HMAC_ALGORITHMS for a in known):
        problems.append(f"{where('demo')}: demo tokens need an HMAC secret (--jwt-secret-file)")
    if merged["demo"] and not demo_mode and not _is_loopback(merged["host"]):
        # With the production key, the demo endpoint signs a token for any name.
        problems.append(
            f"--demo: refused with --host {merged['host']}: beside a configured JWT key the "
            "demo endpoint would sign tokens for any name for anyone who can reach it; "
            "use --demo only on a loopback address"
        )
    if merged["demo_token_ttl"] > MAX_DEMO_TOKEN_TTL:
        problems.append(f"--demo-token-ttl: at most {MAX_DEMO_TOKEN_TTL} seconds")
    if merged["jwt_typ"] is not None and not merged["jwt_typ"].strip():
        problems.append("--jwt-typ: give a media type such as 'at+jwt', or leave it unset")


def _check_origins_and_proxies(
    merged: dict[str, Any], problems: list[str], where: Where, demo_mode: bool
) -> None:
    """Every allowed origin and trusted proxy, parsed once here (a typo fails at start)."""
    origins = merged["allowed_origins"]
    # Demo mode allows the server's own loopback origins; the server fills
    # them in once it knows its port (which --port 0 only tells after binding).
    merged["default_origins"] = origins is None and demo_mode
    origins = origins or ()
    merged["allowed_origins"] = tuple(origins)
    for origin in origins:
        problem = origin_problem(origin)
        if problem:
            problems.append(f"{where('allowed_origins')} {origin!r}: {problem}")
    for proxy in merged["trusted_proxies"]:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            problems.append(f"{where('trusted_proxies')} {proxy!r}: not an address or CIDR")


def _check_files_and_logging(
    merged: dict[str, Any], problems: list[str], where: Where, *, check_files: bool
) -> None:
    """TLS files, the log config file, the task queue, the log level and the loop."""
    if bool(merged["certfile"]) != bool(merged["keyfile"]):
        problems.append("--certfile and --keyfile go together: give both or neither")
    if check_files:
        for name in ("certfile", "keyfile", "log_config"):
            if merged[name] and not os.access(merged[name], os.R_OK):
                problems.append(f"{where(name)} {merged[name]}: cannot read the file")
    if merged["task_queue"] < merged["task_workers"]:
        problems.append(f"{where('task_queue')}: must be at least --task-workers")
    if merged["log_level"].upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        problems.append(
            f"{where('log_level')} {merged['log_level']!r}: use DEBUG, INFO, WARNING or ERROR"
        )
    merged["log_level"] = merged["log_level"].upper()
    merged["loop"] = merged["loop"].lower()
    if merged["loop"] not in LOOPS:
        problems.append(f"{where('loop')} {merged['loop']!r}: use auto, asyncio or uvloop")
    elif merged["loop"] == "uvloop" and importlib.util.find_spec("uvloop") is None:
        problems.append(f"{where('loop')} uvloop: uvloop is not installed (pip install uvloop)")


def _check_cluster(merged: dict[str, Any], problems: list[str], where: Where) -> None:
    """--workers, the broker's heartbeat and node TTL, the node name, the ports."""
    if merged["workers"] > 1 and merged["broker"] == "memory":
        problems.append(
            f"--workers {merged['workers']}: more than one worker needs a Redis broker "
            "(--broker redis://...); with the memory broker every limit, room and "
            "presence would silently be per process"
        )
    if merged["broker_node_ttl"] < 2 * merged["broker_heartbeat"]:
        problems.append(
            f"{where('broker_node_ttl')}: must be at least twice --broker-heartbeat"
        )
    if merged["broker_node_ttl"] + merged["broker_heartbeat"] > 60:
        # The contract: a dead node's users leave presence within 60 s, and a
        # survivor reaps it at its first heartbeat after the TTL.
        problems.append(
            f"{where('broker_node_ttl')}: with --broker-heartbeat at most 60 seconds in all"
        )
    merged["node_name"] = merged["node_name"] or f"{socket.gethostname()}-{os.getpid()}"
    if merged["internal_port"] is not None and merged["internal_port"] == merged["port"] != 0:
        problems.append("--internal-port: must differ from --port")


def _proxy_policy_problems(rooms: RoomPolicy, merged: Mapping[str, Any]) -> list[str]:
    """A ``proxy`` rule in ``[rooms]`` without the URL that decides it: one line each."""
    problems = []
    tables = [("rooms", rooms.default),
              *((f"rooms.namespaces.{name}", policy) for name, policy in rooms.namespaces.items())]
    for key, policy in tables:
        if policy.join == "proxy" and not merged["proxy_subscribe_url"]:
            problems.append(f'{key}.join = "proxy" needs --proxy-subscribe-url')
        if policy.publish == "proxy" and not merged["proxy_publish_url"]:
            problems.append(f'{key}.publish = "proxy" needs --proxy-publish-url')
    return problems


def _load_proxy_key(
    merged: dict[str, Any], problems: list[str], *, check_files: bool
) -> Secret | None:
    path = merged["proxy_key_file"]
    if not path:
        return None
    if not check_files:
        return Secret("x" * MIN_API_KEY_BYTES)
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"--proxy-key-file {path}: cannot read the key: {exc}")
        return None
    if len(key.encode()) < MIN_API_KEY_BYTES:
        problems.append(
            f"--proxy-key-file {path}: the key is {len(key.encode())} bytes; at least "
            f"{MIN_API_KEY_BYTES} are needed (openssl rand -base64 48)"
        )
        return None
    if not key.isprintable():
        problems.append(f"--proxy-key-file {path}: the key must be printable (it is a header)")
        return None
    return Secret(key)


#: An API key must be as hard to guess as an HS256 secret.
MIN_API_KEY_BYTES = 32


def _load_api_key(
    merged: dict[str, Any], problems: list[str], *, check_files: bool
) -> Secret | None:
    key: Secret | None = merged["api_key"]
    path = merged["api_key_file"]
    if key is not None and path:
        problems.append("give only one of --api-key and --api-key-file")
        return None
    if path:
        if not check_files:
            return Secret("x" * MIN_API_KEY_BYTES)
        try:
            key = Secret(Path(path).read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"--api-key-file {path}: cannot read the key: {exc}")
            return None
    if key is not None and len(key.reveal().encode()) < MIN_API_KEY_BYTES:
        problems.append(
            f"--api-key: the key is {len(key.reveal().encode())} bytes; at least "
            f"{MIN_API_KEY_BYTES} are needed (openssl rand -base64 48)"
        )
        return None
    return key


def _check_algorithms(algorithms: Sequence[str], source: str, problems: list[str]) -> None:
    if not algorithms:
        problems.append(f"{source}: give at least one algorithm")
    for alg in algorithms:
        if alg.lower() == "none":
            problems.append(f"{source}: 'none' is never accepted")
        elif alg not in HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS:
            problems.append(f"{source}: unknown algorithm {alg!r}")
    known = HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS
    families = {alg in HMAC_ALGORITHMS for alg in algorithms if alg in known}
    if len(families) > 1:
        problems.append(f"{source}: do not mix HMAC (HS*) and public-key algorithms")


def _load_key(
    merged: dict[str, Any],
    algorithms: Sequence[str],
    problems: list[str],
    where: Callable[[str], str],
    *,
    check_files: bool,
) -> Secret | None:
    names = ("jwt_secret", "jwt_secret_file", "jwt_public_key_file", "jwt_jwks_url")
    given = [n for n in names if merged[n]]
    if len(given) > 1:
        problems.append(
            "give only one of --jwt-secret, --jwt-secret-file, --jwt-public-key-file, "
            "--jwt-jwks-url"
        )
        return None
    if not given:
        return None
    if given == ["jwt_jwks_url"]:
        if any(alg in HMAC_ALGORITHMS for alg in algorithms):
            problems.append(
                f"{where('jwt_jwks_url')}: a JWKS holds public keys: give RS*/PS*/ES*/EdDSA in "
                "--jwt-algorithms (RS256 when not given)"
            )
        return None
    source = given[0]
    flag = where(source)
    if source == "jwt_secret":
        key = merged["jwt_secret"].reveal()
    elif not check_files:
        return Secret("unchecked")
    else:
        try:
            key = Path(merged[source]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{flag} {merged[source]}: cannot read the key: {exc}")
            return None
        if source == "jwt_secret_file":
            key = key.strip()
    if source == "jwt_public_key_file":
        if any(alg in HMAC_ALGORITHMS for alg in algorithms):
            problems.append(f"{flag}: a public key needs RS*/PS*/ES*/EdDSA in --jwt-algorithms")
        problem = _public_key_problem(key)
        if problem:
            problems.append(f"{flag} {merged[source]}: {problem}")
    else:
        if any(alg not in HMAC_ALGORITHMS for alg in algorithms):
            problems.append(f"{flag}: an HMAC secret needs HS256/384/512 in --jwt-algorithms")
        needed = max((MIN_HMAC_KEY_BYTES.get(alg, 0) for alg in algorithms), default=32)
        if len(key.encode()) < needed:
            problems.append(
                f"{flag}: the secret is {len(key.encode())} bytes; "
                f"{'/'.join(algorithms)} needs at least {needed} (RFC 7518 section 3.2)"
            )
    return Secret(key)


def _public_key_problem(pem: str) -> str | None:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        return f"not a PEM public key ({type(exc).__name__})"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
