"""Client address: proxy headers believed only from trusted proxies."""

import pytest

from wsserver.netaddr import TrustedProxies

TRUSTED = TrustedProxies(["127.0.0.1", "10.0.0.0/8"])


@pytest.mark.parametrize(
    ("proxies", "peer", "xff", "real_ip", "expected"),
    [
        ([], "198.51.100.1", "203.0.113.7", None, "198.51.100.1"),  # nobody trusted
        (["127.0.0.1"], "198.51.100.1", "203.0.113.7", None, "198.51.100.1"),  # peer untrusted
        (["127.0.0.1"], "127.0.0.1", "203.0.113.7", None, "203.0.113.7"),
        (["127.0.0.1"], "127.0.0.1", None, "203.0.113.8", "203.0.113.8"),
        (["127.0.0.1"], "127.0.0.1", "203.0.113.7", "203.0.113.8", "203.0.113.7"),
        # A client-supplied first hop is not believed: rightmost untrusted wins.
        (["127.0.0.1"], "127.0.0.1", "1.2.3.4, 203.0.113.9", None, "203.0.113.9"),
        # Chains through several trusted proxies.
        (["127.0.0.1", "10.0.0.0/8"], "127.0.0.1", "203.0.113.7, 10.1.2.3", None, "203.0.113.7"),
        # Garbage in the chain stops the walk at the last trusted hop.
        (["127.0.0.1"], "127.0.0.1", "203.0.113.7, not-an-ip", None, "127.0.0.1"),
        (["127.0.0.1"], "127.0.0.1", None, "bogus", "127.0.0.1"),
        (["::1"], "::1", "2001:db8::1", None, "2001:db8::1"),
        (["127.0.0.1"], "127.0.0.1", "[2001:db8::2]", None, "2001:db8::2"),
        (["127.0.0.1"], "127.0.0.1", "::ffff:203.0.113.5", None, "203.0.113.5"),
    ],
)
def test_client_address(
    proxies: list[str], peer: str, xff: str | None, real_ip: str | None, expected: str
) -> None:
    assert TrustedProxies(proxies).client_address(peer, xff, real_ip) == expected


def test_cidr_membership() -> None:
    assert TRUSTED.is_trusted("10.200.0.1")
    assert not TRUSTED.is_trusted("11.0.0.1")
    assert not TRUSTED.is_trusted("garbage")


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("::1", "::/64"),
    ],
)
def test_limit_key_groups_ipv6_by_64(address: str, key: str) -> None:
    from wsserver.netaddr import limit_key

    assert limit_key(address) == key
