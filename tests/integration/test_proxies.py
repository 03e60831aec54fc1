"""The client address: proxy headers believed only from ``--trusted-proxies``.

Observed through the per-address cap (``--max-connections-per-ip``): two
connections count against the same address exactly when the server resolved
them to the same client. The ``open ... addr=`` log line shows the address.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from limits_helpers import (
    JWT_ENV,
    NO_HANDSHAKE_LIMIT,
    RawConnection,
    RunningServer,
    bearer,
    raw_open,
    refused_status,
    run,
)

Start = Callable[..., RunningServer]


def per_ip(cap: int, *more: str) -> tuple[str, ...]:
    return ("--max-connections-per-ip", str(cap), *NO_HANDSHAKE_LIMIT, *more)


def opened_from(srv: RunningServer, user: str) -> str:
    """The address the server logged for ``user``'s connection."""
    return srv.wait_for_log(rf"open user={re.escape(user)} addr=(\S+)").group(1)


async def close_all(conns: list[RawConnection]) -> None:
    for conn in conns:
        await conn.close_cleanly()


def test_proxy_headers_from_an_untrusted_peer_are_ignored(run_server: Start) -> None:
    srv = run_server(*per_ip(2), env=JWT_ENV)

    async def scenario() -> None:
        opened = [
            await raw_open(srv, "a", headers={"X-Forwarded-For": "203.0.113.1"}),
            await raw_open(srv, "b", headers={"X-Real-IP": "203.0.113.2"}),
        ]
        refused = await refused_status(
            srv, {**bearer("c"), "X-Forwarded-For": "203.0.113.3", "X-Real-IP": "203.0.113.3"}
        )
        assert refused.status == 429  # all three are 127.0.0.1, whatever they claim
        assert opened_from(srv, "a") == opened_from(srv, "b") == "127.0.0.1"
        await close_all(opened)

    run(scenario)


def test_forwarded_addresses_from_a_trusted_proxy_are_counted_apart(run_server: Start) -> None:
    srv = run_server(*per_ip(1, "--trusted-proxies", "127.0.0.1"), env=JWT_ENV)

    async def scenario() -> None:
        opened = [
            await raw_open(srv, "a", headers={"X-Forwarded-For": "203.0.113.7"}),
            await raw_open(srv, "b", headers={"X-Forwarded-For": "203.0.113.8"}),
            await raw_open(srv, "c", headers={"X-Real-IP": "198.51.100.5"}),
            await raw_open(srv, "d"),  # the proxy itself, no header
        ]
        for headers in (
            {"X-Forwarded-For": "203.0.113.7"},
            {"X-Real-IP": "198.51.100.5"},
            {},
        ):
            assert (await refused_status(srv, {**bearer("e"), **headers})).status == 429
        assert opened_from(srv, "a") == "203.0.113.7"
        assert opened_from(srv, "c") == "198.51.100.5"
        assert opened_from(srv, "d") == "127.0.0.1"
        await close_all(opened)

    run(scenario)


def test_a_spoofed_chain_resolves_to_the_rightmost_untrusted_address(run_server: Start) -> None:
    """The client wrote ``1.2.3.4``; the proxy appended what it saw: ``203.0.113.9``."""
    srv = run_server(*per_ip(1, "--trusted-proxies", "127.0.0.1"), env=JWT_ENV)

    async def scenario() -> None:
        first = await raw_open(srv, "a", headers={"X-Forwarded-For": "1.2.3.4, 203.0.113.9"})
        assert opened_from(srv, "a") == "203.0.113.9"
        for chain in ("5.6.7.8, 203.0.113.9", "203.0.113.9, 127.0.0.1"):
            refused = await refused_status(srv, {**bearer("b"), "X-Forwarded-For": chain})
            assert refused.status == 429, chain
        # The spoofed left end was not counted: that address is still free.
        second = await raw_open(srv, "c", headers={"X-Forwarded-For": "1.2.3.4"})
        await close_all([first, second])

    run(scenario)


def test_only_the_listed_proxy_is_trusted(run_server: Start) -> None:
    srv = run_server(*per_ip(1, "--trusted-proxies", "127.0.0.2/32"), env=JWT_ENV)

    async def scenario() -> None:
        opened = [await raw_open(srv, "a", headers={"X-Forwarded-For": "203.0.113.20"})]
        refused = await refused_status(srv, {**bearer("b"), "X-Forwarded-For": "203.0.113.21"})
        assert refused.status == 429  # 127.0.0.1 is not a proxy: both are 127.0.0.1
        for n, client in enumerate(("203.0.113.20", "203.0.113.21")):
            opened.append(await raw_open(srv, f"p{n}", source="127.0.0.2",
                                         headers={"X-Forwarded-For": client}))
            assert opened_from(srv, f"p{n}") == client
        await close_all(opened)

    run(scenario)
