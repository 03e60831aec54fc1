"""OriginPolicy: exact matches after normalisation, look-alikes refused."""

import pytest

from wsserver.errors import OriginRejected
from wsserver.origin import OriginPolicy, normalize_origin, origin_problem

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


WILDCARD = OriginPolicy(["https://*.example.com", "http://*.dev.example.org:8080"])


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("https://APP.Example.com:443", True),  # normalised first
        ("https://xn--bcher-kva.example.com", True),  # an IDN label, as browsers send it
        ("https://example.com", False),  # the bare domain is not "one label under" it
        ("https://a.b.example.com", False),  # the star is exactly one label
        ("https://evilexample.com", False),  # suffix look-alike without the dot
        ("https://a.evilexample.com", False),
        ("https://a.example.com.evil.com", False),
        ("https://example.com.evil.com", False),
        ("http://app.example.com", False),  # scheme is exact
        ("https://app.example.com:8443", False),  # port is exact
        ("https://-bad.example.com", False),  # not a DNS label
        ("https://.example.com", False),
        ("https://app.example.com@evil.com", False),
        ("null", False),
        ("http://api.dev.example.org:8080", True),
        ("http://api.dev.example.org", False),
        ("http://dev.example.org:8080", False),
    ],
)
def test_wildcard_matches_one_label_only(origin: str, allowed: bool) -> None:
    assert WILDCARD.allows(origin) is allowed


@pytest.mark.parametrize(
    "pattern",
    [
        "https://*.com",  # a whole top-level domain
        "https://*",
        "https://a.*.example.com",  # the star only leads
        "https://*.*.example.com",
        "https://*example.com",  # not a whole label
        "https://app.example.*",
        "*.example.com",  # no scheme
        "https://*.example.com/path",
        "ftp://*.example.com",
    ],
)
def test_malformed_wildcards_are_refused(pattern: str) -> None:
    assert origin_problem(pattern) is not None
    with pytest.raises(ValueError):
        OriginPolicy([pattern])


def test_wildcard_is_listed_in_canonical_form() -> None:
    policy = OriginPolicy(["HTTPS://*.Example.COM:443", "https://a.example"])
    assert policy.allowed == {"https://*.example.com", "https://a.example"}
