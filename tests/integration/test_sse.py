"""HTTP streaming (issue 22) against the in-process server, with a real HTTP client.

``GET /sse`` is read by httpx (:mod:`tests.support.streams`); WebSocket members
next to it are the usual clients. Every row of the handshake table is checked
again for a stream, in the contract's order, and each session feature that
the WebSocket has: rooms across transports, the server API, recovery with
``since``, expiry and refresh, keepalive, per-user buckets, back-pressure.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest

from tests.support.clients import ORIGIN, ROOM_TRAFFIC, welcomed
from tests.support.metrics import value
from tests.support.streams import post_send, stream, streamed, ticket
from tests.support.tokens import mint
from tests.support.waiting import until
from wsserver.edge import sse
from wsserver.services import Services

API_KEY = "api-key-for-sse-tests-0123456789-abcdefghijkl"
WITH_KEY = {"api_key": API_KEY}
#: The default namespace open to all; "hist:" rooms keep history.
ROOMS: dict[str, Any] = {
    "join": "anyone",
    "publish": "members",
    "namespaces": {"hist": {"join": "anyone", "publish": "members", "history_size": 20}},
}
with_rooms = pytest.mark.parametrize("rooms_table", [ROOMS])


async def api(port: int, path: str, body: Any) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"http://127.0.0.1:{port}{path}", json=body,
                               headers={"Authorization": f"apikey {API_KEY}"})


# --- the stream ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_welcome_names_the_session_and_replies_arrive_as_events(port: int) -> None:
    client = await streamed(port, mint("alice", ttl=300))
    assert client.headers["content-type"] == "text/event-stream"
    assert client.headers["cache-control"] == "no-store"
    assert client.headers["x-accel-buffering"] == "no"
    assert client.user == "alice"
    assert set(client.welcome or {}) == {"type", "user", "expires_at", "limits", "session"}
    assert sse.SESSION_ID.fullmatch(client.session)
    assert await client.ask({"type": "echo", "data": "hi", "id": 1}) == {
        "type": "echo", "data": "hi", "id": 1}
    assert await client.ask({"type": "ping", "id": "p"}) == {"type": "pong", "id": "p"}
    # Errors arrive on the stream too; the POST itself was accepted.
    assert (await client.ask("not json"))["code"] == "bad_request"
    assert (await client.ask({"type": "nope"}))["code"] == "unknown_type"


@pytest.mark.gen_test
async def test_session_ids_are_unguessable_and_distinct(port: int) -> None:
    first = await streamed(port, mint("alice"))
    second = await streamed(port, mint("alice"))
    assert first.session != second.session
    tag, secret = first.session.split(".")
    assert second.session.startswith(tag + ".")  # same node
    assert len(secret) == 43  # 32 random bytes


@pytest.mark.gen_test
@with_rooms
async def test_a_room_reaches_stream_and_websocket_members_alike(port: int) -> None:
    streaming = await streamed(port, mint("alice"))
    socket = await welcomed(port, mint("bob"))
    await streaming.join("lobby")
    await socket.join("lobby")
    await socket.send({"type": "publish", "room": "lobby", "data": "from ws"})
    await streaming.send({"type": "publish", "room": "lobby", "data": "from sse"})
    await streaming.next(lambda m: m.get("data") == "from sse")  # published, in order
    await socket.send({"type": "publish", "room": "lobby", "data": "end"})
    assert [(m["from"], m["data"]) for m in await socket.messages_until("end")] == [
        ("bob", "from ws"), ("alice", "from sse")]
    assert [(m["from"], m["data"]) for m in await streaming.messages_until("end")] == []


@pytest.mark.gen_test
@with_rooms
async def test_the_senders_own_copy_carries_its_id(port: int) -> None:
    client = await streamed(port, mint("alice"))
    await client.join("lobby")
    own = await client.ask({"type": "publish", "room": "lobby", "data": 1, "id": "m1"})
    assert own == {"type": "message", "room": "lobby", "from": "alice", "data": 1, "id": "m1"}


@pytest.mark.gen_test
@with_rooms
async def test_a_publish_repeated_with_its_idempotency_key_over_a_stream_is_not_published(
    port: int
) -> None:
    """The key works on the stream's POSTs as on a WebSocket, and across them:
    the user's WebSocket repeating the stream's key publishes nothing."""
    streaming = await streamed(port, mint("alice"))
    socket = await welcomed(port, mint("alice"))
    await streaming.join("hist:k")
    await socket.join("hist:k")
    publish = {"type": "publish", "room": "hist:k", "data": "once", "idempotency_key": "k"}
    own = await streaming.ask({**publish, "id": 1})
    assert (own["type"], own["offset"], own["id"]) == ("message", 1, 1)
    again = await streaming.ask({**publish, "id": 2})
    assert again == {"type": "published", "room": "hist:k", "duplicate": True, "offset": 1,
                     "epoch": own["epoch"], "id": 2}
    await socket.next(lambda m: m.get("data") == "once")
    assert await socket.ask({**publish, "id": 3}) == {**again, "id": 3}


@pytest.mark.gen_test
@with_rooms
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_a_server_api_publish_reaches_both_transports(port: int) -> None:
    streaming = await streamed(port, mint("alice"))
    socket = await welcomed(port, mint("bob"))
    await streaming.join("hist:news")
    await socket.join("hist:news")
    answer = await api(port, "/api/publish", {"room": "hist:news", "data": {"n": 1}})
    assert answer.status_code == 200, answer.text
    for member in (streaming, socket):
        got = await member.next(lambda m: m["type"] == "message")
        assert (got["from"], got["data"], got["offset"]) == (None, {"n": 1}, 1)


@pytest.mark.gen_test
@with_rooms
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_an_api_disconnect_ends_the_stream_with_its_close_event(
    port: int, state: Services
) -> None:
    client = await streamed(port, mint("alice"))
    answer = await api(port, "/api/disconnect",
                       {"user": "alice", "code": 4001, "reason": "token revoked"})
    assert answer.status_code == 200
    assert await client.until_closed() == (4001, [])
    assert client.close_reason == "token revoked"
    await until(lambda: state.registry.total == 0)
    # The session is gone: its id is unknown from now on.
    assert (await client.post('{"type":"ping"}')).status_code == 404


@pytest.mark.gen_test
@with_rooms
async def test_recovery_after_the_stream_is_cut(port: int, state: Services) -> None:
    reader = await streamed(port, mint("alice"))
    writer = await welcomed(port, mint("bob"))
    joined = await reader.join("hist:r")
    await writer.join("hist:r")
    await writer.send({"type": "publish", "room": "hist:r", "data": 1})
    first = await reader.next(lambda m: m["type"] == "message")
    assert first["offset"] == 1
    await reader.aclose()  # the client goes without a word
    await until(lambda: state.registry.count_for_user("alice") == 0)
    for n in (2, 3, 4):
        await writer.send({"type": "publish", "room": "hist:r", "data": n})
    await writer.messages_until(4)  # all three are in the history

    back = await streamed(port, mint("alice"))
    since = {"offset": first["offset"], "epoch": joined["epoch"]}
    reply = await back.join("hist:r", since=since)
    assert reply["recovered"] is True
    assert [m["data"] for m in reply["messages"]] == [2, 3, 4]
    assert [m["offset"] for m in reply["messages"]] == [2, 3, 4]
    await writer.send({"type": "publish", "room": "hist:r", "data": 5})
    live = await back.next(lambda m: m["type"] == "message")
    assert (live["data"], live["offset"]) == (5, 5)


@pytest.mark.gen_test
@pytest.mark.parametrize("rooms_table", [{
    "join": "token", "publish": "token",
    "namespaces": {"chat": {"join": "anyone", "publish": "members", "presence": True,
                            "join_leave": True}},
}])
async def test_permissions_presence_and_join_events_over_a_stream(port: int) -> None:
    client = await streamed(port, mint("alice", rooms=["granted"]))
    refused = await client.ask({"type": "join", "room": "secret", "id": 1})
    assert (refused["type"], refused["code"], refused["id"]) == ("error", "forbidden", 1)
    await client.join("granted")
    refused = await client.ask({"type": "publish", "room": "granted", "data": 1, "id": 2})
    assert refused["code"] == "forbidden"
    await client.join("chat:1")
    socket = await welcomed(port, mint("bob"))
    await socket.join("chat:1")
    event = await client.next(lambda m: m["type"] == "user_joined" and m["user"] == "bob")
    assert event["room"] == "chat:1"
    presence = await client.ask({"type": "presence", "room": "chat:1"}, skip=ROOM_TRAFFIC)
    assert (presence["users"], presence["connections"]) == (["alice", "bob"], 2)


@pytest.mark.gen_test
async def test_a_client_that_goes_is_released(port: int, state: Services) -> None:
    client = await streamed(port, mint("alice"))
    session = client.session
    assert state.registry.authenticated == 1
    await client.aclose()
    await until(lambda: state.registry.total == 0)
    assert state.registry.authenticated == 0
    assert value(state.metrics.closes, code=str(sse.CLIENT_GONE)) == 1
    assert value(state.metrics.registry, "wsserver_connections") == 0
    assert (await post_send(port, session, '{"type":"ping"}')).status_code == 404


@pytest.mark.gen_test
async def test_metrics_count_each_transport_and_the_total(port: int, state: Services) -> None:
    streaming = await streamed(port, mint("alice"))
    socket = await welcomed(port, mint("bob"))
    registry = state.metrics.registry
    assert value(registry, "wsserver_connections") == 2
    assert value(registry, "wsserver_connections_by_transport", transport="sse") == 1
    assert value(registry, "wsserver_connections_by_transport", transport="websocket") == 1
    assert value(registry, "wsserver_connections_accepted_total") == 2
    assert value(registry, "wsserver_connections_accepted_by_transport_total",
                 transport="sse") == 1
    await streaming.aclose()
    await until(lambda: state.registry.total == 1)
    assert value(registry, "wsserver_connections_by_transport", transport="sse") == 0
    assert value(registry, "wsserver_connections") == 1
    await socket.close()


# --- the handshake table, for a stream --------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://allowed.example:81"])
async def test_a_foreign_origin_is_403_before_the_stream(port: int, origin: str) -> None:
    refused = await stream(port, mint(), origin=origin)
    assert refused.status == 403
    assert refused.json()["error"] == "origin"
    assert "access-control-allow-origin" not in refused.headers


@pytest.mark.gen_test
async def test_an_allowed_origin_may_read_the_stream(port: int) -> None:
    client = await streamed(port, mint(), origin=ORIGIN)
    assert client.headers["access-control-allow-origin"] == ORIGIN
    assert "Origin" in client.headers["vary"]


@pytest.mark.gen_test
async def test_healthz_is_readable_by_an_allowed_origin_only(port: int) -> None:
    # wsclient.js asks /healthz after a WebSocket failed before opening: a page
    # on another origin must be able to read the answer to tell "up" from "away".
    async with httpx.AsyncClient() as http:
        allowed = await http.get(f"http://127.0.0.1:{port}/healthz", headers={"Origin": ORIGIN})
        foreign = await http.get(f"http://127.0.0.1:{port}/healthz",
                                 headers={"Origin": "http://evil.example"})
    assert allowed.status_code == foreign.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in foreign.headers


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"handshake_rate": "0.01", "handshake_burst": "2"}])
async def test_the_handshake_rate_is_shared_with_websockets(port: int) -> None:
    await welcomed(port)
    await streamed(port)
    refused = await stream(port, mint())
    assert refused.status == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"] == "handshake_rate"


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_connections": "2"}])
async def test_a_full_server_is_503_for_a_stream(port: int) -> None:
    await welcomed(port, mint("a"))
    await streamed(port, mint("b"))
    refused = await stream(port, mint("c"))
    assert refused.status == 503
    assert refused.headers["retry-after"]
    assert refused.json()["error"] == "server_full"


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_connections_per_ip": "1"}])
async def test_the_address_cap_counts_streams(port: int) -> None:
    await streamed(port, mint("a"))
    refused = await stream(port, mint("b"))
    assert refused.status == 429
    assert refused.json()["error"] == "address_cap"


@pytest.mark.gen_test
async def test_no_token_is_403_and_a_query_token_is_not_taken(port: int) -> None:
    refused = await stream(port)
    assert refused.status == 403
    assert refused.json()["error"] == "no_token"
    assert "ticket" in refused.json()["message"]
    # The JWT never travels in a stream's URL: ?token= is not a way in here.
    refused = await stream(port, query=f"?token={mint()}")
    assert refused.status == 403


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda: mint(ttl=-60), "token expired"),
        (lambda: mint(key="another-secret-0123456789-abcdefghij"), "invalid token"),
        (lambda: "not.a.jwt", "invalid token"),
    ],
)
async def test_a_bad_token_is_the_streams_only_event_close_4001(
    port: int, state: Services, make_token: Any, reason: str
) -> None:
    refused = await stream(port, make_token())
    assert refused.status == 200  # as a WebSocket is upgraded, then closed
    assert await refused.until_closed() == (4001, [])
    assert refused.close_reason == reason
    assert state.registry.authenticated == 0
    await until(lambda: state.registry.total == 0)
    assert value(state.metrics.closes, code="4001") == 1


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_connections_per_user": "1"}])
async def test_the_user_cap_counts_both_transports_close_4008(port: int) -> None:
    socket = await welcomed(port, mint("alice"))
    refused = await stream(port, mint("alice"))
    assert await refused.until_closed() == (4008, [])
    await socket.close()
    other = await streamed(port, mint("bob"))  # others are not affected
    assert other.user == "bob"


@pytest.mark.gen_test
async def test_refusals_before_the_stream_come_in_the_contracts_order(port: int) -> None:
    # A foreign origin without a token is the origin's problem first.
    refused = await stream(port, origin="http://evil.example")
    assert (refused.status, refused.json()["error"]) == (403, "origin")


# --- tickets -----------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_ticket_opens_one_stream_once(port: int, state: Services) -> None:
    answer = await ticket(port, mint("alice"))
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"ticket", "expires_in"} and body["expires_in"] == 30
    client = await streamed(port, ticket=body["ticket"])
    assert client.user == "alice"
    assert await client.ask({"type": "echo", "data": 1}) == {"type": "echo", "data": 1}
    again = await stream(port, ticket=body["ticket"])
    assert await again.until_closed() == (4001, [])
    assert again.close_reason == "invalid ticket"
    assert value(state.metrics.tickets, outcome="issued") == 1


@pytest.mark.gen_test
async def test_a_ticket_expires(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "TICKET_TTL", 0.05)
    answer = await ticket(port, mint("alice"))
    await asyncio.sleep(0.3)  # the ticket's lifetime passes; nothing announces it
    expired = await stream(port, ticket=answer.json()["ticket"])
    assert await expired.until_closed() == (4001, [])
    assert expired.close_reason == "invalid ticket"


@pytest.mark.gen_test
async def test_an_unknown_ticket_is_a_bad_token(port: int) -> None:
    for made_up in ("x" * 43, "y" * 500):
        refused = await stream(port, ticket=made_up)
        assert await refused.until_closed() == (4001, [])


@pytest.mark.gen_test
async def test_a_ticket_needs_a_valid_bearer_token(port: int) -> None:
    for tok, message in ((None, "Authorization"), (mint(ttl=-60), "token expired"),
                         ("not.a.jwt", "invalid token")):
        answer = await ticket(port, tok)
        assert answer.status_code == 401, answer.text
        assert message in answer.json()["message"]
    answer = await ticket(port, mint(), headers={"Origin": "http://evil.example"})
    assert answer.status_code == 403


@pytest.mark.gen_test
async def test_tickets_are_never_logged(port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    issued = (await ticket(port, mint("alice"))).json()["ticket"]
    client = await streamed(port, ticket=issued)
    await client.aclose()
    refused = await stream(port, ticket=issued)
    await refused.until_closed()
    lines = "\n".join(record.getMessage() for record in caplog.records
                      if record.name.startswith(("wsserver", "tornado")))
    assert "GET /sse?ticket=[redacted]" in lines
    assert "via=ticket" in lines
    assert issued not in lines


# --- POST /sse/send ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_send_to_an_unknown_session_is_404(port: int) -> None:
    client = await streamed(port, mint())
    tag = client.session.split(".")[0]
    for session in ("", "nope", tag + "." + "A" * 43, client.session + "x"):
        answer = await post_send(port, session, '{"type":"ping"}')
        assert answer.status_code == 404, session
        assert answer.json()["error"] == "unknown_session"


@pytest.mark.gen_test
async def test_send_refuses_what_a_cross_site_form_could_post(port: int) -> None:
    client = await streamed(port, mint())
    foreign = await client.post('{"type":"ping"}', headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x"):
        answer = await client.post('{"type":"ping"}', headers={"Content-Type": content_type})
        assert answer.status_code == 415, content_type
    # None of them reached the session; an allowed origin does.
    allowed = await client.post('{"type":"ping","id":1}', headers={"Origin": ORIGIN})
    assert allowed.status_code == 202
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert await client.recv() == {"type": "pong", "id": 1}


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"max_message_size": "1000"}])
async def test_send_over_the_message_size_is_413(port: int) -> None:
    client = await streamed(port, mint())
    big = json.dumps({"type": "echo", "data": "x" * 1000})
    assert (await client.post(big)).status_code == 413

    async def chunked() -> Any:  # no Content-Length: counted as it arrives
        yield big.encode()

    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{client.base}/sse/send", content=chunked(),
                                 headers={"Content-Type": "application/json",
                                          "X-Session": client.session})
    assert answer.status_code == 413
    assert (await client.post(b'"\xff"')).status_code == 400  # not UTF-8
    # The stream is still open, and nothing reached the session.
    assert await client.ask({"type": "ping"}) == {"type": "pong"}


@pytest.mark.gen_test
async def test_cors_preflight_names_allowed_origins_only(port: int) -> None:
    async with httpx.AsyncClient() as http:
        for path in ("/sse/send", "/auth/ticket"):
            good = await http.options(f"http://127.0.0.1:{port}{path}", headers={
                "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-session, content-type, authorization"})
            assert good.status_code == 204
            assert good.headers["access-control-allow-origin"] == ORIGIN
            assert good.headers["access-control-allow-methods"] == "POST"
            assert "X-Session" in good.headers["access-control-allow-headers"]
            assert "access-control-allow-credentials" not in good.headers
            bad = await http.options(f"http://127.0.0.1:{port}{path}", headers={
                "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
            assert bad.status_code == 403
            assert "access-control-allow-origin" not in bad.headers


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"message_rate": "1", "message_burst": "2"}])
async def test_the_per_user_bucket_is_shared_with_websockets(port: int) -> None:
    streaming = await streamed(port, mint("alice"))
    socket = await welcomed(port, mint("alice"))
    assert (await socket.ask({"type": "ping"}))["type"] == "pong"
    assert (await streaming.ask({"type": "ping"}))["type"] == "pong"
    refused = await streaming.ask({"type": "ping", "id": 3})
    assert (refused["code"], refused["id"]) == ("rate_limited", 3)
    assert refused["retry_after"] > 0


@pytest.mark.gen_test
async def test_a_paused_session_holds_the_post_until_it_resumes(
    port: int, state: Services
) -> None:
    client = await streamed(port, mint("alice"))
    (session,) = state.sessions()
    transport = session.transport
    assert isinstance(transport, sse.SseTransport)
    transport.pause_reading()
    posts = [asyncio.ensure_future(client.post(json.dumps({"type": "echo", "data": n})))
             for n in range(3)]
    # Each POST reached the server and waits there, in order.
    await until(lambda: transport.waiting == 3)
    assert not any(post.done() for post in posts)
    transport.resume_reading()
    assert [(await post).status_code for post in posts] == [202, 202, 202]
    assert [(await client.recv() or {})["data"] for _ in range(3)] == [0, 1, 2]


@pytest.mark.gen_test
async def test_a_paused_session_answers_503_past_its_bounds(
    port: int, state: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "SEND_WAIT", 0.2)
    monkeypatch.setattr(sse, "MAX_HELD", 2)
    client = await streamed(port, mint("alice"))
    (session,) = state.sessions()
    transport = session.transport
    assert isinstance(transport, sse.SseTransport)
    transport.pause_reading()
    waiting = [asyncio.ensure_future(client.post(json.dumps({"type": "echo", "data": n})))
               for n in range(2)]
    await until(lambda: transport.waiting == 2)
    over = await post_send(port, client.session, '{"type":"echo","data":"over"}')
    assert over.status_code == 503 and over.headers["retry-after"] == "1"
    # The two that waited give up after SEND_WAIT: not taken, send again.
    assert [(await post).status_code for post in waiting] == [503, 503]
    transport.resume_reading()
    assert await client.ask({"type": "echo", "data": "after"}) == {"type": "echo",
                                                                    "data": "after"}
    assert value(state.metrics.stream_sends, outcome="busy") == 3


# --- keepalive, expiry, refresh -------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{"ping_interval": "0.2"}])
async def test_keepalive_comments_keep_a_quiet_stream_open(
    port: int, state: Services
) -> None:
    client = await streamed(port, mint("alice"))
    # The in-process server has no periodic sweep: run it as Server would.
    for _ in range(6):
        state.keepalive()
        await asyncio.sleep(0.1)
    await until(lambda: len(client.comments) >= 2)
    assert {text for _, text in client.comments} == {"keepalive"}
    # Each comment counted as answered: the session is alive after many intervals.
    assert await client.ask({"type": "ping"}) == {"type": "pong"}
    assert state.registry.authenticated == 1


@pytest.mark.gen_test
async def test_token_expiry_warns_then_closes_and_refresh_extends(port: int) -> None:
    client = await streamed(port, mint("alice", ttl=2))
    warning = await client.next(lambda m: m["type"] == "token_expiring")
    assert warning["expires_at"] == client.welcome["expires_at"]  # type: ignore[index]
    refreshed = await client.ask({"type": "refresh", "token": mint("alice", ttl=300), "id": 1})
    assert refreshed["type"] == "refreshed" and refreshed["id"] == 1
    assert await client.ask({"type": "ping"}) == {"type": "pong"}

    short = await streamed(port, mint("bob", ttl=1))
    code, messages = await short.until_closed()
    assert code == 4001 and short.close_reason == "token expired"
    assert [m["type"] for m in messages] == ["token_expiring"]
