"""``--broker`` URLs: Sentinel URLs parsed, bad ones refused with a reason, passwords hidden."""

from __future__ import annotations

import pytest

from wsserver.brokers.redis_urls import (
    SentinelURL,
    check_url,
    is_sentinel,
    parse_sentinel_url,
    redact_url,
)


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/mymaster/2",
         SentinelURL((("10.0.0.1", 26379), ("10.0.0.2", 26380)), "mymaster", 2)),
        ("redis+sentinel://sentinel/cache",
         SentinelURL((("sentinel", 26379),), "cache", 0)),
        ("redis+sentinel://:s3cret@a:1,b:2/m/0",
         SentinelURL((("a", 1), ("b", 2)), "m", 0, None, "s3cret")),
        ("redis+sentinel://app:p%40ss@[::1]:5000/m/",
         SentinelURL((("::1", 5000),), "m", 0, "app", "p@ss")),
        ("rediss+sentinel://a/m/1", SentinelURL((("a", 26379),), "m", 1, tls=True)),
    ],
)
def test_sentinel_urls_parse(url: str, parsed: SentinelURL) -> None:
    assert is_sentinel(url)
    assert parse_sentinel_url(url) == parsed
    assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+sentinel://a:1,b:2", "names the master"),
        ("redis+sentinel://a:1//0", "names the master"),
        ("redis+sentinel://a:1/m/zero", "database number"),
        ("redis+sentinel://a:1/m/0/extra", "database number"),
        ("redis+sentinel://a:1/m/\N{SUPERSCRIPT TWO}", "database number"),
        ("redis+sentinel://a:http/m", "not host or host:port"),
        ("redis+sentinel://a:1,,b:2/m", "not host or host:port"),
        ("redis+sentinel://a:0/m", "not 1..65535"),
        ("redis+sentinel://:hunter2@/m", "not host or host:port"),
        ("sentinel://a/m", "use 'memory'"),
        ("redis://", "needs a host"),
        ("unix://", "socket's path"),
    ],
)
def test_bad_urls_say_what_is_wrong_without_the_password(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        check_url(url)
    assert "hunter2" not in str(caught.value)


def test_the_password_stays_out_of_repr() -> None:
    parsed = parse_sentinel_url("redis+sentinel://:hunter2@a/m")
    assert "hunter2" not in repr(parsed) and "***" in repr(parsed)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@redis:6379/2", "redis://:***@redis:6379/2"),
        ("rediss://app:s3cret@[::1]:6380/0", "rediss://app:***@[::1]:6380/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("redis+sentinel://:s3cret@a:1,b:2/m/0", "redis+sentinel://:***@a:1,b:2/m/0"),
        ("redis+sentinel://app:s3cret@[::1]:1,b/m", "redis+sentinel://app:***@[::1]:1,b/m"),
        ("redis+sentinel://a:1,b:2/m/0", "redis+sentinel://a:1,b:2/m/0"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
