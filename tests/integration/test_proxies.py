"""The client address: proxy headers believed only from ``--trusted-proxies``.

Observed through the per-address cap (``--max-connections-per-ip``): two
connections count against the same address exactly when the server resolved
them to the same client. The ``open ... addr=`` log line shows the address.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from tests.support.aio import run
from tests.support.raw import RawConnection, raw_refused, raw_welcomed
from tests.support.servers import NO_HANDSHAKE_LIMIT, RunningServer
from tests.support.tokens import EVERY_ROOM, KEYED_ENV, bearer, mint

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
    srv = run_server(*per_ip(2), env=KEYED_ENV)

    async def scenario() -> None:
        opened = [
            await raw_welcomed(srv, mint("a", **EVERY_ROOM), headers={"X-Forwarded-For": "203.0.113.1"}),
            await raw_welcomed(srv, mint("b", **EVERY_ROOM), headers={"X-Real-IP": "203.0.113.2"}),
        ]
        refused = await raw_refused(
            srv, {**bearer(mint("c", **EVERY_ROOM)), "X-Forwarded-For": "203.0.113.3", "X-Real-IP": "203.0.113.3"}
        )
        assert refused.status == 429  # all three are 127.0.0.1, whatever they claim
        assert opened_from(srv, "a") == opened_from(srv, "b") == "127.0.0.1"
        await close_all(opened)

    run(scenario)


def test_forwarded_addresses_from_a_trusted_proxy_are_counted_apart(run_server: Start) -> None:
    srv = run_server(*per_ip(1, "--trusted-proxies", "127.0.0.1"), env=KEYED_ENV)

    async def scenario() -> None:
        opened = [
            await raw_welcomed(srv, mint("a", **EVERY_ROOM), headers={"X-Forwarded-For": "203.0.113.7"}),
            await raw_welcomed(srv, mint("b", **EVERY_ROOM), headers={"X-Forwarded-For": "203.0.113.8"}),
            await raw_welcomed(srv, mint("c", **EVERY_ROOM), headers={"X-Real-IP": "198.51.100.5"}),
            await raw_welcomed(srv, mint("d", **EVERY_ROOM)),  # the proxy itself, no header
        ]
        for headers in (
            {"X-Forwarded-For": "203.0.113.7"},
            {"X-Real-IP": "198.51.100.5"},
            {},
        ):
            assert (await raw_refused(srv, {**bearer(mint("e", **EVERY_ROOM)), **headers})).status == 429
        assert opened_from(srv, "a") == "203.0.113.7"
        assert opened_from(srv, "c") == "198.51.100.5"
        assert opened_from(srv, "d") == "127.0.0.1"
        await close_all(opened)

    run(scenario)


def test_a_spoofed_chain_resolves_to_the_rightmost_untrusted_address(run_server: Start) -> None:
    """The client wrote ``1.2.3.4``; the proxy appended what it saw: ``203.0.113.9``."""
    srv = run_server(*per_ip(1, "--trusted-proxies", "127.0.0.1"), env=KEYED_ENV)

    async def scenario() -> None:
        first = await raw_welcomed(srv, mint("a", **EVERY_ROOM), headers={"X-Forwarded-For": "1.2.3.4, 203.0.113.9"})
        assert opened_from(srv, "a") == "203.0.113.9"
        for chain in ("5.6.7.8, 203.0.113.9", "203.0.113.9, 127.0.0.1"):
            refused = await raw_refused(srv, {**bearer(mint("b", **EVERY_ROOM)), "X-Forwarded-For": chain})
            assert refused.status == 429, chain
        # The spoofed left end was not counted: that address is still free.
        second = await raw_welcomed(srv, mint("c", **EVERY_ROOM), headers={"X-Forwarded-For": "1.2.3.4"})
        await close_all([first, second])

    run(scenario)


def test_only_the_listed_proxy_is_trusted(run_server: Start) -> None:
    srv = run_server(*per_ip(1, "--trusted-proxies", "127.0.0.2/32"), env=KEYED_ENV)

    async def scenario() -> None:
        opened = [await raw_welcomed(srv, mint("a", **EVERY_ROOM), headers={"X-Forwarded-For": "203.0.113.20"})]
        refused = await raw_refused(srv, {**bearer(mint("b", **EVERY_ROOM)), "X-Forwarded-For": "203.0.113.21"})
        assert refused.status == 429  # 127.0.0.1 is not a proxy: both are 127.0.0.1
        for n, client in enumerate(("203.0.113.20", "203.0.113.21")):
            opened.append(await raw_welcomed(srv, mint(f"p{n}", **EVERY_ROOM), source="127.0.0.2",
                                         headers={"X-Forwarded-For": client}))
            assert opened_from(srv, f"p{n}") == client
        await close_all(opened)

    run(scenario)
