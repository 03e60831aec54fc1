"""Settings: precedence, validation, demo mode, secrets kept out of sight."""

import types
import typing
from pathlib import Path

import pytest

from wsserver.config import OPTIONS, Option, Secret, Settings, load_settings
from wsserver.errors import ConfigError
from wsserver.rooms import NamespacePolicy, RoomPolicy

KEY = "k" * 40


def problems(**kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_defaults_are_demo_mode_on_loopback() -> None:
    settings = load_settings({}, {})
    assert settings.demo_mode and settings.demo and settings.default_origins
    assert (settings.host, settings.port) == ("127.0.0.1", 8888)
    assert settings.verify_key is not None and len(settings.verify_key.reveal()) >= 32
    assert settings.loopback_origins(8888) == ("http://127.0.0.1:8888", "http://localhost:8888")


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.default is not None], ids=lambda o: o.name)
def test_every_default_passes_its_own_parser(option: Option) -> None:
    # The default as --help and the README show it is a value a user could type back.
    default = option.default
    shown = ",".join(default) if isinstance(default, tuple) else str(default)
    assert option.parse(shown) == default


def _has_type(value: object, hint: object) -> bool:
    if typing.get_origin(hint) is types.UnionType:
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(isinstance(part, item) for part in value)
    assert isinstance(hint, type), hint
    return isinstance(value, hint)


@pytest.mark.parametrize("environ", [{}, {"WSSERVER_JWT_SECRET": KEY}], ids=["demo", "keyed"])
def test_every_unset_option_is_worked_out_to_its_declared_type(environ: dict[str, str]) -> None:
    # An option declared with default None on a field typed int, bool, str or tuple
    # (task_workers, demo, node_name, allowed_origins, ...) must be filled in by load_settings.
    settings = load_settings({}, environ)
    for name, hint in typing.get_type_hints(Settings).items():
        assert _has_type(getattr(settings, name), hint), (name, getattr(settings, name), hint)


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    config = tmp_path / "wsserver.toml"
    config.write_text('port = 7000\nmax-connections = 50\nmessage_rate = 3\n')
    env = {"WSSERVER_CONFIG": str(config), "WSSERVER_PORT": "7100", "WSSERVER_JWT_SECRET": KEY}
    settings = load_settings({"port": "7200"}, env)
    assert settings.port == 7200
    settings = load_settings({}, env)
    assert settings.port == 7100
    assert settings.max_connections == 50
    assert settings.message_rate == 3.0
    assert settings.max_connections_per_user == 10
    assert not settings.demo_mode


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        flags={"port": "x", "max_connections": "0", "allowed_origins": "example.com"},
        environ={"WSSERVER_NOPE": "1", "WSSERVER_JWT_ALGORITHMS": "none"},
    )
    text = "\n".join(found)
    for expected in ("--port", "--max-connections", "WSSERVER_NOPE", "'none'", "example.com"):
        assert expected in text
    assert len(found) >= 5


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"host": "0.0.0.0"}, "not a loopback address"),
        ({"jwt_secret": "short"}, "at least 32"),
        ({"jwt_secret": KEY, "jwt_algorithms": "HS512"}, "at least 64"),
        ({"jwt_secret": KEY, "jwt_algorithms": "RS256"}, "HMAC secret needs"),
        ({"jwt_secret": KEY, "jwt_algorithms": "HS256,RS256"}, "do not mix"),
        ({"jwt_secret": KEY, "jwt_secret_file": "/x"}, "only one of"),
        ({"jwt_secret_file": "/nonexistent/key"}, "cannot read the key"),
        ({"jwt_secret": KEY, "certfile": "/x"}, "go together"),
        ({"jwt_secret": KEY, "trusted_proxies": "10.0.0.0/8,bogus"}, "bogus"),
        ({"jwt_secret": KEY, "log_level": "LOUD"}, "--log-level"),
        ({"jwt_secret": KEY, "loop": "tokio"}, "use auto, asyncio or uvloop"),
        ({"jwt_secret": KEY, "task_workers": "4", "task_queue": "2"}, "--task-queue"),
        ({"jwt_secret": KEY, "broker": "http://redis:6379"}, "--broker"),
        ({"jwt_secret": KEY, "broker": "redis://"}, "needs a host"),
        ({"jwt_secret": KEY, "broker": "unix://"}, "socket's path"),
        ({"jwt_secret": KEY, "workers": "2"}, "needs a Redis broker"),
        ({"jwt_secret": KEY, "node_name": "a\tb"}, "--node-name"),
    ],
)
def test_invalid_settings(flags: dict[str, str], fragment: str) -> None:
    assert any(fragment in p for p in problems(flags=flags, environ={}))


def test_secret_never_shown(tmp_path: Path) -> None:
    secret = "s3cr3t-" + "x" * 40
    settings = load_settings({"jwt_secret": secret}, {})
    assert secret not in repr(settings)
    assert secret not in str(settings.jwt_secret)
    assert settings.verify_key is not None and settings.verify_key.reveal() == secret
    found = problems(flags={"jwt_secret": secret, "port": "nope"}, environ={})
    assert all(secret not in p for p in found)
    assert repr(Secret("abc")) == "Secret('**********')"


def test_secret_file_is_read_and_stripped(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    settings = load_settings({"jwt_secret_file": str(key_file)}, {})
    assert settings.verify_key is not None and settings.verify_key.reveal() == KEY
    assert settings.can_sign and not settings.demo and not settings.default_origins
    assert settings.allowed_origins == ()


def test_bad_config_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("port = [\n")
    assert any("not valid TOML" in p for p in problems(flags={"config": str(config)}, environ={}))
    config.write_text("colour = 'blue'\n")
    assert any("unknown setting" in p for p in problems(flags={"config": str(config)}, environ={}))


def test_lists_and_booleans_from_file_and_env(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'allowed-origins = ["https://a.example", "https://b.example"]\ndemo = false\n'
    )
    settings = load_settings({}, {"WSSERVER_CONFIG": str(config), "WSSERVER_JWT_SECRET": KEY})
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.demo is False
    settings = load_settings({}, {"WSSERVER_JWT_SECRET": KEY, "WSSERVER_DEMO": "yes"})
    assert settings.demo is True


CONTRACT_ROOMS = """
[rooms]
join = "token"
publish = "token"
history_size = 0
history_ttl = 300
presence = false
join_leave = false

[rooms.namespaces.chat]
join = "anyone"
publish = "members"
history_size = 100
presence = true
join_leave = true

[rooms.namespaces.user]
join = "owner"
publish = "none"
"""


def test_rooms_default_to_the_contract_and_demo_mode_opens_them() -> None:
    assert load_settings({}, {"WSSERVER_JWT_SECRET": KEY}).rooms == RoomPolicy()
    demo = load_settings({}, {})
    assert demo.demo_mode and demo.rooms == RoomPolicy.demo() and not demo.rooms_from_file


def test_rooms_table_from_the_file(tmp_path: Path) -> None:
    config = tmp_path / "rooms.toml"
    config.write_text(CONTRACT_ROOMS)
    settings = load_settings({"config": str(config)}, {"WSSERVER_JWT_SECRET": KEY})
    assert settings.rooms_from_file
    assert settings.rooms.namespaces["chat"] == NamespacePolicy(
        "anyone", "members", 100, 300, True, True
    )
    assert settings.rooms.policy_for("user:alice").join == "owner"
    assert settings.rooms.policy_for("news:1") == NamespacePolicy()


def test_rooms_table_wins_over_demo_mode(tmp_path: Path) -> None:
    config = tmp_path / "rooms.toml"
    config.write_text(CONTRACT_ROOMS)
    settings = load_settings({"config": str(config)}, {})
    assert settings.demo_mode and settings.rooms_from_file
    assert settings.rooms.default.join == "token"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[rooms]\njoin = "everyone"\n',
         "rooms.join: unknown value 'everyone' (use token, anyone, owner, proxy or none)"),
        ('[rooms.namespaces.chat]\njoin = "everyone"\n',
         "rooms.namespaces.chat.join: unknown value 'everyone'"),
        ('[rooms.namespaces.chat]\npublish = "anyone"\n',
         "rooms.namespaces.chat.publish: unknown value 'anyone' (use token, members, proxy or none)"),
        ("[rooms]\nhistory_size = '100'\n", "rooms.history_size: expected an integer"),
        ("[rooms]\npresence = 1\n", "rooms.presence: expected true or false"),
        ("[rooms]\nhistroy_size = 1\n", "rooms.histroy_size: unknown setting"),
        ("[rooms.namespaces.Chat]\n", "rooms.namespaces.Chat: namespace names are"),
        ("rooms = 'open'\n", "rooms: expected a table"),
    ],
)
def test_bad_rooms_tables_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "rooms.toml"
    config.write_text(text)
    found = problems(flags={"config": str(config)}, environ={"WSSERVER_JWT_SECRET": KEY})
    assert any(p.startswith(f"{config}: {expected}") for p in found), found


def test_rooms_come_only_from_the_file() -> None:
    found = problems(flags={}, environ={"WSSERVER_ROOMS": "open", "WSSERVER_JWT_SECRET": KEY})
    assert found == ["WSSERVER_ROOMS: unknown setting"]


@pytest.mark.parametrize(
    "flags, budget",
    [
        ({}, (200.0, 400)),
        ({"frame_rate": "50", "frame_burst": "60"}, (50.0, 60)),
        ({"message_rate": "500", "message_burst": "900"}, (1000.0, 1800)),
    ],
)
def test_frame_budget_never_below_twice_the_message_budget(
    flags: dict[str, str], budget: tuple[float, int]
) -> None:
    settings = load_settings({"jwt_secret": "x" * 32, **flags}, {})
    assert settings.frame_budget == budget


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"port": "x"}, "--port: invalid value 'x': not a whole number"),
        ({"max_connections": "1.5"}, "--max-connections: invalid value '1.5': not a whole number"),
        ({"message_rate": "fast"}, "--message-rate: invalid value 'fast': not a number"),
    ],
)
def test_value_errors_read_as_english_not_python(flags: dict[str, str], expected: str) -> None:
    found = problems(environ={}, flags=flags)
    assert found == [expected]
    assert "int()" not in found[0] and "float" not in found[0]


def test_none_algorithm_is_one_problem_not_two() -> None:
    assert problems(environ={}, flags={"jwt_algorithms": "none"}) == [
        "--jwt-algorithms: 'none' is never accepted"
    ]
    assert problems(environ={}, flags={"jwt_secret": KEY, "jwt_algorithms": "none"}) == [
        "--jwt-algorithms: 'none' is never accepted"
    ]


def test_problems_name_the_file_key_that_set_the_value(tmp_path: Path) -> None:
    path = tmp_path / "wsserver.toml"
    path.write_text('host = "0.0.0.0"\nallowed-origins = ["example.com"]\n')
    found = problems(environ={}, flags={"config": str(path)})
    assert any(line.startswith(f"{path}: host 0.0.0.0: not a loopback") for line in found)
    assert any(line.startswith(f"{path}: allowed-origins 'example.com'") for line in found)
    assert not any("--host" in line.split(":")[0] for line in found)


def test_invalid_toml_blames_the_file_not_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("host = \n")
    (line,) = problems(environ={}, flags={"config": str(path)})
    assert line.startswith(f"{path}: not valid TOML")


def test_a_table_is_not_a_value(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("[port]\nx = 1\n")
    assert problems(environ={}, flags={"config": str(path)}) == [f"{path}: port: expected a value, not a table"]


def test_wildcard_origin_is_accepted_and_a_broken_one_refused() -> None:
    settings = load_settings({"allowed_origins": "https://*.example.com"}, {})
    assert settings.allowed_origins == ("https://*.example.com",)
    (line,) = problems(environ={}, flags={"allowed_origins": "https://*.com"})
    assert line.startswith("--allowed-origins 'https://*.com': ")


# --- hardening: the demo endpoint beside a production key (issue 13, item 2) ---


def test_demo_beside_a_key_is_refused_off_loopback() -> None:
    found = problems(flags={"jwt_secret": KEY, "demo": True, "host": "0.0.0.0"}, environ={})
    assert any(p.startswith("--demo: refused with --host 0.0.0.0") for p in found), found


def test_demo_beside_a_key_is_allowed_on_loopback() -> None:
    settings = load_settings({"jwt_secret": KEY, "demo": True, "host": "::1"}, {})
    assert settings.demo and not settings.demo_mode


def test_demo_token_ttl_is_capped() -> None:
    found = problems(flags={"demo_token_ttl": "3601"}, environ={})
    assert found == ["--demo-token-ttl: at most 3600 seconds"]
    assert load_settings({"demo_token_ttl": "3600"}, {}).demo_token_ttl == 3600


def test_hardening_options_parse() -> None:
    settings = load_settings(
        {"jwt_secret": KEY, "jwt_typ": "at+jwt", "max_token_lifetime": "86400",
         "max_unverified_connections": "8", "task_per_user": "3"}, {})
    assert settings.jwt_typ == "at+jwt" and settings.max_token_lifetime == 86400.0
    assert settings.max_unverified_connections == 8 and settings.task_per_user == 3
    assert problems(flags={"jwt_typ": " "}, environ={})[0].startswith("--jwt-typ:")


def test_broker_options() -> None:
    settings = load_settings({}, {})
    assert (settings.broker, settings.workers, settings.broker_probe_interval) == ("memory", 1, 2.0)
    assert settings.node_name  # host name and pid
    url = "redis://:hunter2@redis.internal:6379/1"
    settings = load_settings(
        {"broker": url, "workers": "4", "node_name": "edge-1"}, {"WSSERVER_JWT_SECRET": KEY}
    )
    assert (settings.broker, settings.workers, settings.node_name) == (url, 4, "edge-1")
    assert "hunter2" not in repr(settings)
    assert load_settings({"broker": "unix:///run/redis.sock"}, {}).broker.startswith("unix:")


# --- the backend: proxies and JWKS ----------------------------------------------


@pytest.mark.parametrize(
    ("rooms", "expected"),
    [
        ('[rooms]\njoin = "proxy"\n', 'rooms.join = "proxy" needs --proxy-subscribe-url'),
        ('[rooms.namespaces.mod]\npublish = "proxy"\n',
         'rooms.namespaces.mod.publish = "proxy" needs --proxy-publish-url'),
    ],
)
def test_a_proxy_rule_needs_its_url(tmp_path: Path, rooms: str, expected: str) -> None:
    config = tmp_path / "rooms.toml"
    config.write_text(rooms)
    assert problems(flags={"config": str(config)}, environ={"WSSERVER_JWT_SECRET": KEY}) == [
        expected]
    kind = "subscribe" if "join" in rooms else "publish"
    settings = load_settings({"config": str(config),
                              f"proxy_{kind}_url": "http://127.0.0.1:9000/ws"},
                             {"WSSERVER_JWT_SECRET": KEY})
    assert settings.proxy_urls == {kind: "http://127.0.0.1:9000/ws"}


@pytest.mark.parametrize("url", ["ftp://x/y", "127.0.0.1:9000/ws", "http:///path"])
def test_proxy_urls_are_http_urls_with_a_host(url: str) -> None:
    found = problems(flags={"proxy_rpc_url": url}, environ={"WSSERVER_JWT_SECRET": KEY})
    assert found == [f"--proxy-rpc-url: invalid value {url!r}: use an http:// or https:// URL "
                     "with a host"]


def test_proxy_headers_are_header_names() -> None:
    settings = load_settings({"proxy_headers": "Cookie, X-Session"}, {"WSSERVER_JWT_SECRET": KEY})
    assert settings.proxy_headers == ("Cookie", "X-Session")
    assert problems(flags={"proxy_headers": "Cookie,Bad Header"},
                    environ={"WSSERVER_JWT_SECRET": KEY})[0].endswith(
        "'Bad Header' is not an HTTP header name")


def test_the_proxy_key_file_is_read_and_checked(tmp_path: Path) -> None:
    good, short = tmp_path / "good.key", tmp_path / "short.key"
    good.write_text("p" * 40 + "\n")
    short.write_text("p" * 10)
    settings = load_settings({"proxy_key_file": str(good)}, {"WSSERVER_JWT_SECRET": KEY})
    assert settings.proxy_key is not None and settings.proxy_key.reveal() == "p" * 40
    assert "p" * 40 not in repr(settings)
    found = problems(flags={"proxy_key_file": str(short)}, environ={"WSSERVER_JWT_SECRET": KEY})
    assert "the key is 10 bytes; at least 32 are needed" in found[0]


def test_a_connect_proxy_alone_is_not_demo_mode() -> None:
    settings = load_settings({"proxy_connect_url": "http://app:pw@127.0.0.1:9000/c",
                              "host": "0.0.0.0"}, {})
    assert not settings.demo_mode and not settings.demo
    assert settings.verify_key is None
    assert "app:pw" not in repr(settings)  # a URL may hold credentials


def test_a_jwks_url_takes_rs256_by_default_and_no_other_key() -> None:
    settings = load_settings({"jwt_jwks_url": "https://idp.example/certs"}, {})
    assert settings.jwt_algorithms == ("RS256",) and not settings.demo_mode
    assert settings.verify_key is None
    settings = load_settings({"jwt_jwks_url": "https://idp.example/certs",
                              "jwt_algorithms": "ES256,RS256"}, {})
    assert settings.jwt_algorithms == ("ES256", "RS256")
    assert problems(flags={"jwt_jwks_url": "https://idp.example/certs"},
                    environ={"WSSERVER_JWT_SECRET": KEY}) == [
        "give only one of --jwt-secret, --jwt-secret-file, --jwt-public-key-file, --jwt-jwks-url"]
    found = problems(flags={"jwt_jwks_url": "https://idp.example/certs",
                            "jwt_algorithms": "HS256"}, environ={})
    assert found == ["--jwt-jwks-url: a JWKS holds public keys: give RS*/PS*/ES*/EdDSA in "
                     "--jwt-algorithms (RS256 when not given)"]
