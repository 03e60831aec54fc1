"""OriginPolicy: exact matches after normalisation, look-alikes refused."""

import pytest

from wsserver.errors import OriginRejected
from wsserver.origin import OriginPolicy, normalize_origin

POLICY = OriginPolicy(["https://chat.example.com", "http://127.0.0.1:8888"])


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://chat.example.com", True),
        ("HTTPS://Chat.Example.COM", True),
        ("https://chat.example.com:443", True),
        ("http://127.0.0.1:8888", True),
        ("http://chat.example.com", False),  # scheme differs
        ("https://chat.example.com:8443", False),  # port differs
        ("https://chat.example.com.evil.com", False),  # suffix look-alike
        ("https://evilchat.example.com", False),
        ("https://evil.com/chat.example.com", False),  # path is not an origin
        ("https://chat.example.com@evil.com", False),  # userinfo trick
        ("null", False),  # sandboxed iframes, file:// pages
        ("", False),
        ("http://127.0.0.1:8889", False),
        ("http://localhost:8888", False),  # not listed
        ("https://xn--chat-example-com", False),
    ],
)
def test_allows_exact_origins_only(origin: str, allowed: bool) -> None:
    assert POLICY.allows(origin) is allowed


def test_check_passes_requests_without_origin() -> None:
    POLICY.check(None)  # non-browser clients send no Origin


def test_check_raises_403_rejection() -> None:
    with pytest.raises(OriginRejected) as info:
        POLICY.check("https://evil.com")
    assert info.value.status == 403


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("http://EXAMPLE.com:80", "http://example.com"),
        ("https://example.com:8443", "https://example.com:8443"),
        ("http://[::1]:8888", "http://[::1]:8888"),
        ("ftp://example.com", None),
        ("http://example.com/", None),
        ("http://example.com:99999", None),
    ],
)
def test_normalize_origin(raw: str, canonical: str | None) -> None:
    assert normalize_origin(raw) == canonical


def test_bad_configured_origin_fails_at_start() -> None:
    with pytest.raises(ValueError):
        OriginPolicy(["example.com"])
