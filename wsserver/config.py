"""Settings: one object built from defaults < config file < environment < flags.

Every option is declared once in :data:`OPTIONS`; the argument parser, the
``WSSERVER_*`` environment variables and the TOML config file are all derived
from that table, so the three sources cannot drift apart. The room policy is
the exception: a nested table, it comes only from the file's ``[rooms]``
(parsed by :meth:`wsserver.rooms.RoomPolicy.from_table`). :func:`load_settings`
collects every problem it finds and raises one :class:`ConfigError` listing
them all, before anything is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import secrets
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from wsserver.errors import ConfigError
from wsserver.origin import origin_problem
from wsserver.rooms import RoomPolicy

ENV_PREFIX = "WSSERVER_"

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
#: RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
MIN_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
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


#: Public name of the boolean parser, so the CLI can tell which flags take --no-.
bool_parser = _bool


def _secret(text: str) -> Secret:
    return Secret(text)


def _text(text: str) -> str:
    return text


#: Schemes ``--broker`` accepts besides ``memory``.
BROKER_SCHEMES = ("redis", "rediss", "unix")


def _broker(text: str) -> str:
    if text == "memory":
        return text
    parts = urlsplit(text)
    if parts.scheme not in BROKER_SCHEMES:
        raise ValueError("use 'memory' or a redis://, rediss:// or unix:// URL")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("a unix:// URL needs the socket's path (unix:///run/redis.sock)")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("a Redis URL needs a host (redis://127.0.0.1:6379/0)")
    return text


def _node_name(text: str) -> str:
    if not text or "\0" in text or len(text) > 128 or not text.isprintable():
        raise ValueError("1 to 128 printable characters")
    return text


@dataclass(frozen=True)
class Option:
    """One setting: its flag, how to parse it, its default and its help."""

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


OPTIONS: tuple[Option, ...] = (
    Option("host", _text, "127.0.0.1", "listen address"),
    Option("port", _port, 8888, "listen port (0 picks a free one)"),
    Option("jwt_secret", _secret, None, "HMAC key for HS256/384/512 (prefer --jwt-secret-file)"),
    Option("jwt_secret_file", _text, None, "file holding the HMAC key", "FILE"),
    Option("jwt_public_key_file", _text, None, "PEM public key for RS*/PS*/ES*/EdDSA", "FILE"),
    Option("jwt_algorithms", _csv, ("HS256",), "comma list of accepted algorithms; never 'none'"),
    Option("jwt_audience", _text, None, "when set, tokens must carry this 'aud'"),
    Option("jwt_issuer", _text, None, "when set, tokens must carry this 'iss'"),
    Option("jwt_leeway", _non_negative_float, 10.0, "seconds of clock skew allowed on exp/nbf/iat"),
    Option(
        "jwt_typ",
        _text,
        None,
        "when set, the token header 'typ' must equal it (RFC 8725 explicit typing)",
    ),
    Option(
        "max_token_lifetime",
        _positive_float,
        None,
        "when set, tokens must carry 'iat' and exp - iat may not exceed it (seconds)",
    ),
    Option("allowed_origins", _csv, None, "comma list of origins allowed to connect (exact, or https://*.example.com)"),
    Option("max_connections", _positive_int, 1000, "open connections, whole server"),
    Option("max_connections_per_user", _positive_int, 10, "open connections per JWT 'sub'"),
    Option("max_connections_per_ip", _positive_int, 100, "open connections per client address"),
    Option(
        "max_unverified_connections",
        _positive_int,
        64,
        "upgraded connections whose token failed, waiting for their 4001 close; "
        "counted apart from --max-connections",
    ),
    Option("message_rate", _positive_float, 10.0, "per-user messages per second"),
    Option("message_burst", _positive_int, 20, "per-user bucket size"),
    Option(
        "rate_limit_strikes",
        _positive_int,
        10,
        "messages sent while rate limited before the connection is closed with 4029",
    ),
    Option("handshake_rate", _positive_float, 20.0, "per-address new connections per second"),
    Option("handshake_burst", _positive_int, 30, "per-address handshake bucket size"),
    Option("max_message_size", _positive_int, 65536, "bytes; larger messages close with 1009"),
    Option(
        "frame_rate",
        _positive_float,
        200.0,
        "frames per second per connection, pings and fragments included; a flood closes "
        "with 1008 (never below 2 x --message-rate)",
    ),
    Option(
        "frame_burst",
        _positive_int,
        400,
        "per-connection frame bucket size (never below 2 x --message-burst)",
    ),
    Option(
        "fragment_timeout",
        _positive_float,
        10.0,
        "seconds a fragmented message may stay unfinished before closing with 1008",
    ),
    Option(
        "max_write_buffer",
        _positive_int,
        1024 * 1024,
        "bytes of unsent data per connection before it is closed as a slow consumer (4009)",
    ),
    Option("task_workers", _positive_int, None, "processes in the CPU task pool (default: CPUs)"),
    Option(
        "task_queue",
        _positive_int,
        None,
        "tasks waiting or running at once (default: 4 x workers)",
    ),
    Option("task_timeout", _positive_float, 30.0, "seconds before a task is answered 'timeout'"),
    Option("task_per_connection", _positive_int, 2, "tasks in flight per connection"),
    Option(
        "task_per_user",
        _positive_int,
        4,
        "tasks in flight per user, across all of that user's connections",
    ),
    Option(
        "tasks_module",
        _text,
        None,
        "module imported at start to register more tasks",
        "MODULE",
    ),
    Option("monitor_interval", _positive_float, 10.0, "seconds between connection-count checks"),
    Option("ping_interval", _non_negative_float, 20.0, "seconds between keepalive pings (0: off)"),
    Option(
        "token_warning",
        _non_negative_float,
        60.0,
        "seconds before 'exp' to send token_expiring",
    ),
    Option(
        "drain_timeout",
        _non_negative_float,
        10.0,
        "seconds to wait for connections to close on shutdown",
    ),
    Option(
        "header_timeout",
        _positive_float,
        10.0,
        "seconds a client has to send its request headers",
    ),
    Option("max_header_size", _positive_int, 16384, "bytes of HTTP request headers accepted"),
    Option("certfile", _text, None, "TLS certificate chain (PEM) to serve wss://", "FILE"),
    Option("keyfile", _text, None, "TLS private key (PEM)", "FILE"),
    Option(
        "trusted_proxies",
        _csv,
        (),
        "comma list of proxy addresses/CIDRs whose X-Forwarded-For is believed",
    ),
    Option("demo", _bool, None, "enable POST /auth/demo-token (on in demo mode)"),
    Option(
        "demo_token_ttl",
        _positive_int,
        900,
        f"lifetime in seconds of demo tokens (at most {MAX_DEMO_TOKEN_TTL})",
    ),
    Option(
        "access_log",
        _bool,
        True,
        "one INFO line per HTTP request; probes, polls and upgrades only at DEBUG",
    ),
    Option("log_level", _text, "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Option("api_key", _secret, None, "server API key, at least 32 bytes (prefer --api-key-file)"),
    Option("api_key_file", _text, None, "file holding the server API key", "FILE"),
    Option(
        "internal_port",
        _port,
        None,
        "serve /metrics, /stats and /api/ on this port only (off the public one)",
    ),
    Option("internal_host", _text, "127.0.0.1", "address of the --internal-port listener"),
    Option(
        "room_publish_rate",
        _positive_float,
        50.0,
        "client publishes per second into one room (every member receives each one)",
    ),
    Option("room_publish_burst", _positive_int, 100, "per-room publish bucket size"),
    Option("max_room_members", _positive_int, 10000, "connections in one room on one node"),
    Option("max_recovery", _positive_int, 300, "messages at most recovered on a join with 'since'"),
    Option(
        "broker",
        _broker,
        "memory",
        "'memory' (this process only) or a Redis URL shared by every node "
        "(redis://host:port/db, rediss://..., unix:///path)",
        "URL",
    ),
    Option(
        "workers",
        _positive_int,
        1,
        "processes serving the same port on this machine; more than 1 needs a Redis broker",
    ),
    Option("node_name", _node_name, None, "this node in /api/nodes, logs and metrics "
           "(default: host name and pid)", "NAME"),
    Option(
        "broker_probe_interval",
        _positive_float,
        2.0,
        "seconds between readiness probes through the broker",
    ),
    Option(
        "broker_heartbeat",
        _positive_float,
        5.0,
        "seconds between this node's heartbeats through a Redis broker (rarely changed)",
    ),
    Option(
        "broker_node_ttl",
        _positive_float,
        15.0,
        "seconds without a heartbeat after which a node counts as dead and its users "
        "leave presence (at least twice --broker-heartbeat; the two add up to at most 60)",
    ),
)

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """Validated configuration, built once and handed down explicitly.

    ``demo_mode`` is true when no JWT key was configured: the server then
    signs with an ephemeral secret, serves only on loopback and enables the
    demo token endpoint.
    """

    host: str = "127.0.0.1"
    port: int = 8888
    jwt_secret: Secret | None = None
    jwt_secret_file: str | None = None
    jwt_public_key_file: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 10.0
    jwt_typ: str | None = None
    max_token_lifetime: float | None = None
    allowed_origins: tuple[str, ...] = ()
    max_connections: int = 1000
    max_connections_per_user: int = 10
    max_connections_per_ip: int = 100
    max_unverified_connections: int = 64
    message_rate: float = 10.0
    message_burst: int = 20
    rate_limit_strikes: int = 10
    handshake_rate: float = 20.0
    handshake_burst: int = 30
    max_message_size: int = 65536
    frame_rate: float = 200.0
    frame_burst: int = 400
    fragment_timeout: float = 10.0
    max_write_buffer: int = 1024 * 1024
    task_workers: int = 1
    task_queue: int = 4
    task_timeout: float = 30.0
    task_per_connection: int = 2
    task_per_user: int = 4
    tasks_module: str | None = None
    monitor_interval: float = 10.0
    ping_interval: float = 20.0
    token_warning: float = 60.0
    drain_timeout: float = 10.0
    header_timeout: float = 10.0
    max_header_size: int = 16384
    certfile: str | None = None
    keyfile: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    demo: bool = False
    demo_token_ttl: int = 900
    access_log: bool = True
    log_level: str = "INFO"
    api_key: Secret | None = field(default=None, repr=False)
    api_key_file: str | None = None
    internal_port: int | None = None
    internal_host: str = "127.0.0.1"
    room_publish_rate: float = 50.0
    room_publish_burst: int = 100
    max_room_members: int = 10000
    max_recovery: int = 300
    #: Not in repr: a Redis URL may hold a password.
    broker: str = field(default="memory", repr=False)
    workers: int = 1
    node_name: str = ""
    broker_probe_interval: float = 2.0
    broker_heartbeat: float = 5.0
    broker_node_ttl: float = 15.0
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


def add_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """Add one flag per option (or per option named in ``only``); unset flags stay
    absent so precedence works."""
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
        parser.add_argument(option.flag, help=option.help + suffix, **kwargs)


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
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    values: dict[str, Any] = {}
    # Where each value came from, so a problem names the flag, variable or file key to fix.
    sources: dict[str, str] = {}

    config_path = flags.pop("config", None)
    config_source = "--config"
    if not config_path and environ.get(ENV_PREFIX + "CONFIG"):
        config_path, config_source = environ[ENV_PREFIX + "CONFIG"], ENV_PREFIX + "CONFIG"
    if config_path:
        values.update(_read_config_file(config_path, config_source, problems, sources))

    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX):].lower()
        option = OPTIONS_BY_NAME.get(name)
        if option is None:
            problems.append(f"{key}: unknown setting")
            continue
        _parse_into(values, option, raw, key, problems)
        sources[name] = key

    for name, raw in flags.items():
        option = OPTIONS_BY_NAME.get(name)
        if option is None:
            continue
        if isinstance(raw, bool) or not isinstance(raw, str):
            values[name] = raw
        else:
            _parse_into(values, option, raw, option.flag, problems)
        sources[name] = option.flag

    return _build(values, problems, sources, check_files=check_files)


def _parse_into(
    values: dict[str, Any], option: Option, raw: str, source: str, problems: list[str]
) -> None:
    try:
        values[option.name] = option.parse(raw)
    except ValueError as exc:
        shown = "<hidden>" if option.parse is _secret else repr(raw)
        problems.append(f"{source}: invalid value {shown}: {exc}")


def _read_config_file(
    path: str, given_by: str, problems: list[str], sources: dict[str, str]
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
    defaults = {option.name: option.default for option in OPTIONS}
    rooms: RoomPolicy | None = values.pop("rooms", None)
    merged = {**defaults, **values}

    def where(name: str) -> str:
        """The flag, variable or file key that set ``name`` (its flag when defaulted)."""
        return sources.get(name) or OPTIONS_BY_NAME[name].flag

    # With --workers N, each server process gets its share of the CPUs for
    # tasks, so N processes do not start N x CPUs task workers by default.
    workers = merged["task_workers"] or max(1, (os.cpu_count() or 1) // merged["workers"])
    merged["task_workers"] = workers
    merged["task_queue"] = merged["task_queue"] or 4 * workers

    algorithms = tuple(merged["jwt_algorithms"])
    merged["jwt_algorithms"] = algorithms
    _check_algorithms(algorithms, where("jwt_algorithms"), problems)
    # Later checks look only at real algorithms: 'none' or a typo is reported once, above.
    known = tuple(alg for alg in algorithms if alg in HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS)

    verify_key = _load_key(merged, known, problems, where, check_files=check_files)
    demo_mode = verify_key is None and not any(
        merged[name] for name in ("jwt_secret", "jwt_secret_file", "jwt_public_key_file")
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

    if bool(merged["certfile"]) != bool(merged["keyfile"]):
        problems.append("--certfile and --keyfile go together: give both or neither")
    if check_files:
        for name in ("certfile", "keyfile"):
            if merged[name] and not os.access(merged[name], os.R_OK):
                problems.append(f"{where(name)} {merged[name]}: cannot read the file")
    if merged["task_queue"] < merged["task_workers"]:
        problems.append(f"{where('task_queue')}: must be at least --task-workers")
    if merged["log_level"].upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        problems.append(
            f"{where('log_level')} {merged['log_level']!r}: use DEBUG, INFO, WARNING or ERROR"
        )
    merged["log_level"] = merged["log_level"].upper()
    merged["api_key"] = _load_api_key(merged, problems, check_files=check_files)
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

    # A [rooms] table wins even in demo mode: trying a real policy locally,
    # without a key, must show that policy, not the demo's open rooms.
    merged["rooms_from_file"] = rooms is not None
    if rooms is None:
        rooms = RoomPolicy.demo() if demo_mode else RoomPolicy()
    merged["rooms"] = rooms

    if problems:
        raise ConfigError(problems)
    return Settings(**merged, demo_mode=demo_mode, verify_key=verify_key)


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
    given = [n for n in ("jwt_secret", "jwt_secret_file", "jwt_public_key_file") if merged[n]]
    if len(given) > 1:
        problems.append("give only one of --jwt-secret, --jwt-secret-file, --jwt-public-key-file")
        return None
    if not given:
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
