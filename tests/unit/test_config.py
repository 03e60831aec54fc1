"""Settings: precedence, validation, demo mode, secrets kept out of sight."""

from pathlib import Path

import pytest

from wsserver.config import OPTIONS, Secret, Settings, load_settings
from wsserver.errors import ConfigError

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


def test_settings_defaults_match_the_option_table() -> None:
    defaults = Settings()
    for option in OPTIONS:
        if option.default is not None and option.name not in ("allowed_origins",):
            assert getattr(defaults, option.name) == option.default, option.name


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
