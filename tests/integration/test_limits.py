"""Rate limits and connection caps against the real server over real sockets.

Message rate: one token bucket per user, shared by that user's connections
(``rate_limited`` with ``retry_after``, 4029 for a flood that goes on).
Handshake rate per address (429 with ``Retry-After``). Caps: whole server
(503 with ``Retry-After``), per address (429), per user (close 4008), with
counts that stay exact whatever way connections end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from websockets.exceptions import ConnectionClosed

from tests.support.aio import run
from tests.support.clients import welcomed
from tests.support.metrics import reaches, read
from tests.support.raw import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawConnection,
    client_frame,
    close_frame,
    raw_connect,
    raw_refused,
    raw_welcomed,
)
from tests.support.servers import NO_HANDSHAKE_LIMIT, RunningServer
from tests.support.tokens import EVERY_ROOM, KEYED_ENV, bearer, mint

Start = Callable[..., RunningServer]


def gone(end: Callable[[RawConnection], None]) -> Callable[[RawConnection], Awaitable[None]]:
    """``end`` (drop or reset: no close frame) as a coroutine, like ``close_cleanly``."""

    async def leave(conn: RawConnection) -> None:
        end(conn)

    return leave


# --- message rate ---------------------------------------------------------------


def test_connections_of_one_user_share_one_bucket(run_server: Start) -> None:
    """A drains the bucket, so B (same user) is limited; another user is not."""
    # A slow refill (one token per 2 s) so nothing trickles back mid-test.
    srv = run_server("--message-rate", "0.5", "--message-burst", "4",
                     "--rate-limit-strikes", "50", env=KEYED_ENV)

    async def scenario() -> None:
        a = await welcomed(srv, mint("alice", **EVERY_ROOM))
        b = await welcomed(srv, mint("alice", **EVERY_ROOM))
        carol = await welcomed(srv, mint("carol", **EVERY_ROOM))
        for n in range(4):
            assert await a.ask({"type": "ping", "id": n}) == {"type": "pong", "id": n}
        limited = await b.ask({"type": "ping", "id": "b-1"})
        assert limited["type"] == "error" and limited["code"] == "rate_limited", limited
        assert limited["id"] == "b-1"
        # One token at 0.5 per second is at most two seconds away.
        assert 0 < limited["retry_after"] <= 2
        assert await carol.ask({"type": "ping", "id": 7}) == {"type": "pong", "id": 7}
        # The drained bucket is the user's, not the first connection's.
        again = await a.ask({"type": "echo", "data": "x", "id": "a-5"})
        assert (again["code"], again["id"]) == ("rate_limited", "a-5")
        for ws in (a, b, carol):
            await ws.close()

    run(scenario)


def test_a_flood_that_goes_on_is_closed_with_4029(run_server: Start) -> None:
    """Burst answered, then ``--rate-limit-strikes`` errors, then close 4029."""
    srv = run_server("--message-rate", "0.5", "--message-burst", "3",
                     "--rate-limit-strikes", "5", env=KEYED_ENV)

    async def scenario() -> None:
        flooder = await welcomed(srv, mint("mallory", **EVERY_ROOM))
        bystander = await welcomed(srv, mint("bob", **EVERY_ROOM))
        try:
            for n in range(40):
                await flooder.send({"type": "ping", "id": n})
        except ConnectionClosed:
            pass  # the server may close before the flood is all sent
        code, received = await flooder.until_closed()
        assert code == 4029
        assert [m["type"] for m in received[:3]] == ["pong"] * 3
        errors = received[3:]
        assert [(m["code"], m["id"]) for m in errors] == [("rate_limited", n) for n in range(3, 8)]
        assert all(m["retry_after"] > 0 for m in errors)
        # The flood cost the flooder only.
        assert await bystander.ask({"type": "ping"}) == {"type": "pong"}
        await bystander.close()
        assert await read(srv, "wsserver_closes_total", code="4029") == 1

    run(scenario)


def test_a_sustained_flood_above_the_rate_is_closed_with_4029(run_server: Start) -> None:
    """Five times the rate, for seconds: the client keeps sending while limited.

    Four of every five messages are refused, but a token comes back between
    them; that must not wipe the strikes, or such a flood is never closed.
    """
    srv = run_server("--message-rate", "20", "--message-burst", "2",
                     "--rate-limit-strikes", "10", env=KEYED_ENV)

    async def scenario() -> None:
        flooder = await welcomed(srv, mint("mallory", **EVERY_ROOM))
        closing = asyncio.ensure_future(flooder.until_closed())
        sent = 0
        try:
            while not closing.done() and sent < 300:  # 3 s at 100 messages/s
                await flooder.send({"type": "ping", "id": sent})
                sent += 1
                await asyncio.sleep(0.01)  # the flood's own pace, 5x the rate
        except ConnectionClosed:
            pass
        await asyncio.wait([closing], timeout=1.0)
        if not closing.done():
            closing.cancel()
            raise AssertionError(f"still open after {sent} messages at 5x the rate")
        code, received = await closing
        assert code == 4029
        assert sum(1 for m in received if m.get("code") == "rate_limited") >= 10

    run(scenario)


def test_a_user_back_after_refill_starts_with_a_full_bucket(run_server: Start) -> None:
    """Close every connection of a drained user, wait for the refill: the full burst again."""
    rate, burst = 4, 5
    srv = run_server("--message-rate", str(rate), "--message-burst", str(burst),
                     "--rate-limit-strikes", "50", env=KEYED_ENV)

    async def burst_replies() -> list[str]:
        """Connect, send one more than the burst at once, return the replies' kinds."""
        ws = await welcomed(srv, mint("dave", **EVERY_ROOM))
        for n in range(burst + 1):
            await ws.send({"type": "ping", "id": n})
        replies = [await ws.recv() for _ in range(burst + 1)]
        await ws.close()
        return [reply.get("code", reply["type"]) for reply in replies]

    async def scenario() -> None:
        assert await burst_replies() == ["pong"] * burst + ["rate_limited"]
        await asyncio.sleep(burst / rate + 0.1)  # the bucket's refill time: a real wait
        assert await burst_replies() == ["pong"] * burst + ["rate_limited"]

    run(scenario)


# --- handshake rate ---------------------------------------------------------------


def test_handshake_burst_gets_429_with_retry_after_for_that_address_only(
    run_server: Start,
) -> None:
    srv = run_server("--handshake-rate", "2", "--handshake-burst", "3", env=KEYED_ENV)

    async def scenario() -> None:
        opened = [await raw_welcomed(srv, mint(f"u{n}", **EVERY_ROOM)) for n in range(3)]
        refused = await raw_refused(srv, bearer(mint("u3", **EVERY_ROOM)))
        assert refused.status == 429
        retry_after = int(refused.headers["retry-after"])
        assert retry_after == 1  # one token at 2/s, rounded up to whole seconds
        # Another address has its own bucket.
        opened.append(await raw_welcomed(srv, mint("u4", **EVERY_ROOM), source="127.0.0.2"))
        await asyncio.sleep(retry_after)  # the advertised wait: the bucket refills
        opened.append(await raw_welcomed(srv, mint("u5", **EVERY_ROOM)))
        assert await read(srv, "wsserver_rejections_total", reason="handshake_rate") == 1
        for conn in opened:
            await conn.close_cleanly()

    run(scenario)


# --- caps ---------------------------------------------------------------------------


def test_server_cap_answers_503_with_retry_after_until_a_slot_frees(run_server: Start) -> None:
    srv = run_server("--max-connections", "3", *NO_HANDSHAKE_LIMIT, env=KEYED_ENV)

    async def scenario() -> None:
        opened = [await raw_welcomed(srv, mint(f"u{n}", **EVERY_ROOM)) for n in range(3)]
        for source in ("127.0.0.1", "127.0.0.2"):  # the whole server, every address
            refused = await raw_refused(srv, bearer(mint("late", **EVERY_ROOM)), source=source)
            assert refused.status == 503
            assert int(refused.headers["retry-after"]) >= 1
        await opened.pop().close_cleanly()
        await reaches(srv, 2, "wsserver_connections")
        opened.append(await raw_welcomed(srv, mint("late", **EVERY_ROOM)))
        assert await read(srv, "wsserver_rejections_total", reason="server_full") == 2
        for conn in opened:
            await conn.close_cleanly()

    run(scenario)


def test_address_cap_answers_429_for_that_address_only(run_server: Start) -> None:
    """The cap holds per address, and every way of leaving frees the address's slot."""
    srv = run_server("--max-connections-per-ip", "2", *NO_HANDSHAKE_LIMIT, env=KEYED_ENV)

    async def scenario() -> None:
        opened = [await raw_welcomed(srv, mint("a", **EVERY_ROOM)), await raw_welcomed(srv, mint("b", **EVERY_ROOM))]
        assert (await raw_refused(srv, bearer(mint("c", **EVERY_ROOM)))).status == 429
        opened.append(await raw_welcomed(srv, mint("c", **EVERY_ROOM), source="127.0.0.2"))
        leaving: list[Callable[[RawConnection], Awaitable[object]]] = [
            RawConnection.close_cleanly, gone(RawConnection.drop), gone(RawConnection.reset),
        ]
        for n, leave in enumerate(leaving):
            await leave(opened.pop(0))
            await reaches(srv, 2, "wsserver_connections")
            opened.insert(1, await raw_welcomed(srv, mint(f"next{n}", **EVERY_ROOM)))
            assert (await raw_refused(srv, bearer(mint("c", **EVERY_ROOM)))).status == 429
        assert await read(srv, "wsserver_rejections_total", reason="address_cap") == 4
        for conn in opened:
            await conn.close_cleanly()

    run(scenario)


def test_user_cap_upgrades_then_closes_4008(run_server: Start) -> None:
    srv = run_server("--max-connections-per-user", "2", *NO_HANDSHAKE_LIMIT, env=KEYED_ENV)

    async def scenario() -> None:
        opened = [await raw_welcomed(srv, mint("alice", **EVERY_ROOM)), await raw_welcomed(srv, mint("alice", **EVERY_ROOM))]
        third = await raw_connect(srv, bearer(mint("alice", **EVERY_ROOM)))
        assert third.status == 101
        code, before = await third.read_until_close()
        assert code == 4008 and before == []
        await third.close_cleanly_after_server_close()
        # The operator's log names the user who was refused, not "user=-".
        srv.wait_for_log(r"close user=alice .*code=4008")
        opened.append(await raw_welcomed(srv, mint("bob", **EVERY_ROOM)))
        await opened.pop(0).close_cleanly()
        await reaches(srv, 2, "wsserver_connections")
        opened.append(await raw_welcomed(srv, mint("alice", **EVERY_ROOM)))
        for conn in opened:
            await conn.close_cleanly()

    run(scenario)


def test_counts_stay_exact_whichever_way_connections_end(run_server: Start) -> None:
    """Clean close, FIN without a close frame, RST: each frees its slot, once."""
    srv = run_server("--max-connections", "2", *NO_HANDSHAKE_LIMIT, env=KEYED_ENV)

    async def scenario() -> None:
        first, second = await raw_welcomed(srv, mint("u1", **EVERY_ROOM)), await raw_welcomed(srv, mint("u2", **EVERY_ROOM))
        assert (await raw_refused(srv, bearer(mint("extra", **EVERY_ROOM)))).status == 503
        leaving: list[Callable[[RawConnection], Awaitable[object]]] = [
            RawConnection.close_cleanly, gone(RawConnection.drop), gone(RawConnection.reset),
        ]
        for n, leave in enumerate(leaving):
            await leave(first)
            await reaches(srv, 1, "wsserver_connections")
            first = await raw_welcomed(srv, mint(f"v{n}", **EVERY_ROOM))
            assert (await raw_refused(srv, bearer(mint("extra", **EVERY_ROOM)))).status == 503
        assert await read(srv, "wsserver_connections") == 2
        for conn in (first, second):
            await conn.close_cleanly()
        await reaches(srv, 0, "wsserver_connections")

    run(scenario)


def test_failed_handshakes_do_not_leak_a_slot(run_server: Start) -> None:
    """403 (no token) and 4001 (bad token) leave the one slot free."""
    srv = run_server("--max-connections", "1", *NO_HANDSHAKE_LIMIT, env=KEYED_ENV)

    async def scenario() -> None:
        for _ in range(5):
            assert (await raw_refused(srv)).status == 403
        for _ in range(5):
            bad = await raw_connect(srv, {"Authorization": "Bearer not-a-jwt"})
            assert bad.status == 101
            code, _ = await bad.read_until_close()
            assert code == 4001
            await bad.close_cleanly_after_server_close()
        # Each 4001 connection is forgotten in the same step that counts its close.
        await reaches(srv, 5, "wsserver_closes_total", code="4001")
        only = await raw_welcomed(srv, mint("alice", **EVERY_ROOM))
        assert (await raw_refused(srv, bearer(mint("bob", **EVERY_ROOM)))).status == 503
        await only.close_cleanly()

    run(scenario)


def test_concurrent_connects_never_exceed_the_caps(run_server: Start) -> None:
    """30 handshakes at once: exactly the cap gets in, server-wide and per user."""
    srv = run_server("--max-connections", "10", "--max-connections-per-user", "4",
                     *NO_HANDSHAKE_LIMIT, env=KEYED_ENV)

    async def attempt(user: str) -> tuple[RawConnection, str]:
        conn = await raw_connect(srv, bearer(mint(user, **EVERY_ROOM)))
        if conn.status != 101:
            conn.drop()
            return conn, str(conn.status)
        first = await conn.read_frame()
        if first.opcode == OP_CLOSE:
            return conn, str(first.close_code)
        assert first.json()["type"] == "welcome"
        return conn, "welcome"

    async def all_at_once(users: list[str], expected: list[str]) -> None:
        results = await asyncio.gather(*(attempt(user) for user in users))
        assert sorted(outcome for _, outcome in results) == expected
        assert await read(srv, "wsserver_connections") == expected.count("welcome")
        await asyncio.gather(*(
            conn.close_cleanly() if outcome == "welcome" else conn.close_cleanly_after_server_close()
            for conn, outcome in results if outcome in ("welcome", "4008")
        ))
        await reaches(srv, 0, "wsserver_connections")

    async def scenario() -> None:
        many = [f"user{n}" for n in range(30)]
        await all_at_once(many, ["503"] * 20 + ["welcome"] * 10)
        await all_at_once(["same"] * 10, ["4008"] * 6 + ["welcome"] * 4)
        # Nothing leaked from either round: the whole cap is free again.
        await all_at_once(many, ["503"] * 20 + ["welcome"] * 10)

    run(scenario)


def test_client_close_codes_become_a_fixed_label_set(run_server: Start) -> None:
    """Hardening item 7: a client-chosen code is no metric series of its own,
    and a code RFC 6455 section 7.4 forbids on the wire is failed with 1002."""
    srv = run_server(env=KEYED_ENV)

    async def scenario() -> None:
        chosen = await raw_welcomed(srv, mint("alice", **EVERY_ROOM))
        await chosen.send(close_frame(4321))
        assert (await chosen.read_until_close())[0] == 4321
        forbidden = await raw_welcomed(srv, mint("bob", **EVERY_ROOM))
        await forbidden.send(close_frame(1005))
        assert (await forbidden.read_until_close())[0] == 1002
        await reaches(srv, 1, "wsserver_closes_total", code="1002")
        await reaches(srv, 1, "wsserver_closes_total", code="other")
        assert await read(srv, "wsserver_closes_total", code="4321") == 0

    run(scenario)


def without_fin(frame: bytes) -> bytes:
    """``frame`` as a fragment that more fragments must follow."""
    return bytes([frame[0] & 0x7F]) + frame[1:]


FRAME_FLAGS = ("--message-rate", "1", "--message-burst", "1", "--frame-rate", "10",
               "--frame-burst", "20", "--fragment-timeout", "0.3")


def test_a_ping_flood_is_closed_with_1008(run_server: Start) -> None:
    """Hardening item 6: pings spend from the connection's frame budget."""
    srv = run_server(*FRAME_FLAGS, env=KEYED_ENV)

    async def scenario() -> None:
        flooder = await raw_welcomed(srv, mint("mallory", **EVERY_ROOM))
        await flooder.send(client_frame(OP_PING, b"") * 100)
        code, before = await flooder.read_until_close()
        assert code == 1008
        assert 0 < len(before) <= 20 and all(f.opcode == OP_PONG for f in before)
        bystander = await welcomed(srv, mint("bob", **EVERY_ROOM))
        assert await bystander.ask({"type": "ping"}) == {"type": "pong"}
        await bystander.close()

    run(scenario)


def test_a_flood_of_empty_continuation_frames_is_closed_with_1008(run_server: Start) -> None:
    srv = run_server(*FRAME_FLAGS, env=KEYED_ENV)

    async def scenario() -> None:
        flooder = await raw_welcomed(srv, mint("mallory", **EVERY_ROOM))
        start = without_fin(client_frame(OP_TEXT, b""))
        empty = without_fin(client_frame(0x0, b""))  # continuation frames
        await flooder.send(start + empty * 100)
        assert (await flooder.read_until_close())[0] == 1008

    run(scenario)


def test_a_fragmented_message_left_unfinished_is_closed_with_1008(run_server: Start) -> None:
    srv = run_server(*FRAME_FLAGS, env=KEYED_ENV)

    async def scenario() -> None:
        slow = await raw_welcomed(srv, mint("mallory", **EVERY_ROOM))
        await slow.send(without_fin(client_frame(OP_TEXT, b'{"type": ')))
        await asyncio.sleep(0.4)
        # A pong keeps the connection alive but does not finish the message.
        await slow.send(client_frame(OP_PONG, b""))
        await slow.send(client_frame(OP_PONG, b""))
        assert (await slow.read_until_close())[0] == 1008

    run(scenario)
