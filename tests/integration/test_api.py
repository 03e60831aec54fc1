"""The server API with a real HTTP client, and its effect on real WebSocket clients."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient

from tests.support.clients import AsyncClient, welcomed
from tests.support.metrics import value
from tests.support.raw import RawConnection
from tests.support.tokens import mint
from wsserver.services import Services

KEY = "api-key-for-tests-0123456789-abcdefghijklmnop"
WITH_KEY = {"api_key": KEY}

#: Rooms for the API: the default namespace open, one namespace per feature.
API_ROOMS: dict[str, Any] = {
    "join": "anyone",
    "publish": "members",
    "namespaces": {
        "hist": {"join": "anyone", "publish": "members", "history_size": 10},
        "chat": {"join": "anyone", "publish": "members", "presence": True, "join_leave": True},
        "user": {"join": "owner", "publish": "none"},
    },
}

pytestmark = pytest.mark.parametrize("rooms_table", [API_ROOMS])


class Api:
    """``/api/`` calls over HTTP: (status, JSON body)."""

    def __init__(self, client: AsyncHTTPClient, port: int) -> None:
        self.client = client
        self.base = f"http://127.0.0.1:{port}"

    async def call(
        self,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        if headers is None:
            headers = {"Authorization": f"apikey {KEY}"}
        if raw is None and body is not None:
            raw = json.dumps(body).encode()
        response = await self.client.fetch(
            self.base + path,
            method="GET" if raw is None else "POST",
            body=raw,
            headers=headers,
            raise_error=False,
        )
        assert response.headers.get("Content-Type", "").startswith("application/json")
        return response.code, json.loads(response.body) if response.body else None

    async def metrics(self) -> str:
        response = await self.client.fetch(self.base + "/metrics")
        return response.body.decode()


@pytest.fixture
def api(port: int, http_client: AsyncHTTPClient) -> Api:
    return Api(http_client, port)


def counted(metrics: str, endpoint: str, outcome: str) -> float:
    return value(metrics, "wsserver_api_requests_total", endpoint=endpoint, outcome=outcome)


async def member(port: int, user: str, *rooms: str) -> AsyncClient:
    conn = await welcomed(port, mint(user))
    for room in rooms:
        reply = await conn.ask({"type": "join", "room": room})
        assert reply["type"] == "joined", reply
    return conn


async def receives_nothing(conn: AsyncClient) -> None:
    assert await conn.ask({"type": "ping", "id": "q"}) == {"type": "pong", "id": "q"}


# --- off, keys, errors -------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("path", "body"),
    [("/api/publish", {"room": "r", "data": 1}), ("/api/broadcast", {}), ("/api/rooms", None),
     ("/api/nodes", None), ("/api/presence?room=chat:1", None), ("/api/history?room=hist:1", None),
     ("/api/disconnect", {"user": "alice"}), ("/api/anything/else", None), ("/api/", None)],
)
async def test_without_a_key_every_api_path_is_404(api: Api, path: str, body: Any) -> None:
    status, _ = await api.call(path, body)
    assert status == 404


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_a_missing_or_wrong_key_is_401_and_counted(api: Api) -> None:
    before = await api.metrics()
    wrong = [
        {},
        {"Authorization": "apikey wrong-key"},
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"apikey {KEY[:-1]}"},
        {"X-API-Key": "wrong-key"},
        {"X-API-Key": KEY + "x"},
    ]
    for headers in wrong:
        status, body = await api.call("/api/rooms", headers=headers)
        assert status == 401, headers
        assert body["error"] == "unauthorized" and "apikey" in body["message"]
        assert KEY not in json.dumps(body)
    for headers in ({"Authorization": f"apikey {KEY}"}, {"X-API-Key": KEY},
                    {"Authorization": f"ApiKey  {KEY} "}):
        status, body = await api.call("/api/rooms", headers=headers)
        assert (status, body) == (200, {"rooms": {}}), headers
    # An unknown path answers 401 first: without the key, nothing is learnt.
    assert (await api.call("/api/nope", headers={}))[0] == 401
    assert (await api.call("/api/nope"))[0] == 404
    after = await api.metrics()
    assert counted(after, "rooms", "unauthorized") - counted(before, "rooms", "unauthorized") == 6
    assert counted(after, "rooms", "ok") - counted(before, "rooms", "ok") == 3
    assert counted(after, "unknown", "unauthorized") == 1
    assert KEY not in after


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"not json", "JSON"),
        (b"[1, 2]", "object"),
        (b'"text"', "object"),
        (b"\xff\xfe", "UTF-8"),
        (b"", "JSON"),
        (b'{"data": 1}', "room"),
        (b'{"room": 7, "data": 1}', "room"),
        (b'{"room": "", "data": 1}', "room"),
        (json.dumps({"room": "r" * 129, "data": 1}).encode(), "128"),
        (b'{"room": "BAD:x", "data": 1}', "namespace"),
        (b'{"room": "a\\u0000b", "data": 1}', "printable"),
        (b'{"room": "lobby"}', "data"),
        (b'{"room": "lobby", "data": 1, "idempotency_key": 5}', "idempotency_key"),
        (b'{"room": "lobby", "data": NaN}', ""),
    ],
)
async def test_malformed_publish_bodies_are_400_with_a_message(
    api: Api, raw: bytes, words: str
) -> None:
    status, body = await api.call("/api/publish", raw=raw)
    assert status == 400, body
    assert body["error"] == "bad_request"
    assert isinstance(body["message"], str) and body["message"]
    assert words.lower() in body["message"].lower(), body["message"]


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{**WITH_KEY, "max_message_size": "1024"}])
async def test_a_body_over_max_message_size_is_413(api: Api, port: int) -> None:
    conn = await member(port, "alice", "lobby")
    status, body = await api.call("/api/publish", {"room": "lobby", "data": "x" * 1100})
    assert status == 413 and body["error"] == "too_large"
    status, _ = await api.call("/api/publish", {"room": "lobby", "data": "x" * 900})
    assert status == 200
    assert (await conn.recv() or {})["data"] == "x" * 900


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_a_wrong_method_is_405_naming_the_right_one(api: Api) -> None:
    response = await api.client.fetch(api.base + "/api/publish", headers={"X-API-Key": KEY},
                                      raise_error=False)
    assert response.code == 405 and response.headers["Allow"] == "POST"
    body = json.loads(response.body)
    assert body["error"] == "method_not_allowed" and "POST" in body["message"]
    status, body = await api.call("/api/rooms", {})
    assert status == 405 and body["error"] == "method_not_allowed" and "GET" in body["message"]
    assert counted(await api.metrics(), "rooms", "method_not_allowed") == 1


# --- publish, broadcast, disconnect ------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_publish_reaches_members_from_null(api: Api, port: int) -> None:
    alice = await member(port, "alice", "lobby")
    bob = await member(port, "bob", "lobby")
    outsider = await member(port, "carol", "elsewhere")
    data = {"text": "maintenance at 5", "n": [1, 2]}
    assert await api.call("/api/publish", {"room": "lobby", "data": data}) == (200, {})
    expected = {"type": "message", "room": "lobby", "from": None, "data": data}
    assert await alice.recv() == expected
    assert await bob.recv() == expected
    await receives_nothing(outsider)
    # A room with no members is fine too: nobody receives it.
    assert await api.call("/api/publish", {"room": "empty", "data": 1}) == (200, {})


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_the_backend_publishes_to_a_users_own_room_with_one_call(
    api: Api, port: int
) -> None:
    """The issue's done-when: one HTTP call, and the user's connection shows it."""
    alice = await member(port, "alice", "user:alice")
    bob = await welcomed(port, mint("bob"))
    reply = await bob.ask({"type": "join", "room": "user:alice"})
    assert reply["code"] == "forbidden"
    notice = {"kind": "invoice", "id": 42}
    assert await api.call("/api/publish", {"room": "user:alice", "data": notice}) == (200, {})
    assert await alice.recv() == {"type": "message", "room": "user:alice", "from": None,
                                 "data": notice}
    await receives_nothing(bob)


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_the_same_idempotency_key_publishes_once(api: Api, port: int) -> None:
    alice = await member(port, "alice", "hist:1", "hist:2")
    first = await api.call("/api/publish",
                           {"room": "hist:1", "data": "a", "idempotency_key": "k1"})
    assert first[0] == 200 and first[1]["offset"] == 1 and first[1]["epoch"]
    again = await api.call("/api/publish",
                           {"room": "hist:1", "data": "changed", "idempotency_key": "k1"})
    assert again == first
    other = await api.call("/api/publish",
                           {"room": "hist:1", "data": "b", "idempotency_key": "k2"})
    assert other[1]["offset"] == 2
    # The key is per room.
    elsewhere = await api.call("/api/publish",
                               {"room": "hist:2", "data": "c", "idempotency_key": "k1"})
    assert elsewhere[1]["offset"] == 1
    got = [await alice.recv() for _ in range(3)]
    assert [(m["room"], m["data"], m["offset"]) for m in got] == [
        ("hist:1", "a", 1), ("hist:1", "b", 2), ("hist:2", "c", 1)]
    assert all(m["from"] is None and m["epoch"] == first[1]["epoch"] for m in got[:2])
    await receives_nothing(alice)


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_broadcast_answers_in_order(api: Api, port: int) -> None:
    alice = await member(port, "alice", "a", "hist:1")
    bob = await member(port, "bob", "b")
    status, body = await api.call("/api/broadcast",
                                  {"rooms": ["b", "hist:1", "a", "nobody-here"], "data": "all"})
    assert status == 200
    results = body["results"]
    assert len(results) == 4
    assert results[0] == {} and results[2] == {} and results[3] == {}
    assert results[1]["offset"] == 1 and results[1]["epoch"]
    got = sorted([(m["room"], m["from"], m["data"]) for m in
                  [await alice.recv(), await alice.recv()]])
    assert got == [("a", None, "all"), ("hist:1", None, "all")]
    assert await bob.recv() == {"type": "message", "room": "b", "from": None, "data": "all"}


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_a_retried_broadcast_publishes_once(api: Api, port: int) -> None:
    alice = await member(port, "alice", "a", "hist:1")
    body = {"rooms": ["a", "hist:1"], "data": "once", "idempotency_key": "job-7"}
    first = await api.call("/api/broadcast", body)
    assert first[0] == 200 and first[1]["results"][1]["offset"] == 1
    assert await api.call("/api/broadcast", body) == first
    got = [await alice.recv() or {} for _ in range(2)]
    assert sorted(m["room"] for m in got) == ["a", "hist:1"]
    await receives_nothing(alice)


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
@pytest.mark.parametrize(
    "body",
    [
        {"rooms": [f"r{i}" for i in range(1001)], "data": 1},
        {"rooms": [], "data": 1},
        {"rooms": "a", "data": 1},
        {"rooms": ["a", 3], "data": 1},
        {"rooms": ["a", "BAD:x"], "data": 1},
        {"rooms": ["a"]},
    ],
)
async def test_bad_broadcasts_are_400_and_publish_nothing(
    api: Api, port: int, body: dict[str, Any]
) -> None:
    alice = await member(port, "alice", "a", "r1")
    status, answer = await api.call("/api/broadcast", body)
    assert status == 400 and answer["error"] == "bad_request" and answer["message"]
    await receives_nothing(alice)


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_broadcast_to_1000_rooms_is_allowed(api: Api, port: int) -> None:
    alice = await member(port, "alice", "r999")
    status, body = await api.call("/api/broadcast",
                                  {"rooms": [f"r{i}" for i in range(1000)], "data": 1})
    assert status == 200 and len(body["results"]) == 1000
    assert (await alice.recv() or {})["room"] == "r999"


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_disconnect_closes_every_connection_of_the_user(api: Api, port: int) -> None:
    alice1 = await member(port, "alice", "lobby")
    alice2 = await welcomed(port, mint("alice"))
    bob = await member(port, "bob", "lobby")
    assert await api.call("/api/disconnect", {"user": "alice"}) == (200, {})
    for conn in (alice1, alice2):
        assert await conn.recv() is None
        assert (conn.close_code, conn.close_reason) == (4003, "disconnected by the server")
    await receives_nothing(bob)
    # Nobody by that name: nothing to do, still 200.
    assert await api.call("/api/disconnect", {"user": "nobody"}) == (200, {})


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_a_disconnected_user_leaves_their_rooms(api: Api, port: int) -> None:
    bob = await member(port, "bob", "chat:1")
    assert await bob.recv() == {"type": "user_joined", "room": "chat:1", "user": "bob"}
    alice = await member(port, "alice", "chat:1")
    assert await bob.recv() == {"type": "user_joined", "room": "chat:1", "user": "alice"}
    assert await alice.recv() == {"type": "user_joined", "room": "chat:1", "user": "alice"}
    assert await api.call("/api/disconnect", {"user": "alice"}) == (200, {})
    assert await alice.recv() is None
    assert await bob.recv() == {"type": "user_left", "room": "chat:1", "user": "alice"}
    assert await api.call("/api/presence?room=chat:1") == (
        200, {"room": "chat:1", "users": ["bob"], "connections": 1})


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
@pytest.mark.parametrize("code", [4000, 4321, 4999])
async def test_disconnect_with_a_custom_code(api: Api, port: int, code: int) -> None:
    alice = await welcomed(port, mint("alice"))
    body = {"user": "alice", "code": code, "reason": "account closed"}
    assert await api.call("/api/disconnect", body) == (200, {})
    assert await alice.recv() is None
    assert (alice.close_code, alice.close_reason) == (code, "account closed")


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
@pytest.mark.parametrize(
    "body",
    [
        {"user": "alice", "code": 3999},
        {"user": "alice", "code": 5000},
        {"user": "alice", "code": 1000},
        {"user": "alice", "code": "4003"},
        {"user": "alice", "code": True},
        {"user": "alice", "code": 4003.5},
        {"user": "alice", "reason": "x" * 124},
        {"user": "alice", "reason": 5},
        {"user": ""},
        {"user": 5},
        {},
    ],
)
async def test_bad_disconnects_are_400_and_close_nothing(
    api: Api, port: int, body: dict[str, Any]
) -> None:
    alice = await welcomed(port, mint("alice"))
    status, answer = await api.call("/api/disconnect", body)
    assert status == 400 and answer["error"] == "bad_request" and answer["message"]
    await receives_nothing(alice)


# --- looking inside ------------------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_rooms_presence_and_nodes(api: Api, port: int, state: Services) -> None:
    await member(port, "alice", "lobby", "chat:1")
    await member(port, "alice", "chat:1")
    await member(port, "bob", "chat:1")
    await welcomed(port, mint("carol"))  # in no room
    assert await api.call("/api/rooms") == (200, {"rooms": {
        "chat:1": {"connections": 3, "users": 2},
        "lobby": {"connections": 1, "users": 1},
    }})
    assert await api.call("/api/presence?room=chat:1") == (
        200, {"room": "chat:1", "users": ["alice", "bob"], "connections": 3})
    assert await api.call("/api/presence?room=chat:empty") == (
        200, {"room": "chat:empty", "users": [], "connections": 0})
    for path in ("/api/presence?room=lobby", "/api/presence", "/api/presence?room=BAD:x"):
        status, body = await api.call(path)
        assert status == 400 and body["error"] == "bad_request", path
    status, body = await api.call("/api/nodes")
    assert status == 200
    [node] = body["nodes"]
    assert node["name"] == state.node_name
    assert (node["connections"], node["users"]) == (4, 3)
    assert node["uptime"] >= 0


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
async def test_history(api: Api, port: int) -> None:
    for n in range(3):
        status, _ = await api.call("/api/publish", {"room": "hist:1", "data": n})
        assert status == 200
    status, page = await api.call("/api/history?room=hist:1")
    assert status == 200
    epoch = page["epoch"]
    assert page["offset"] == 3
    assert [(m["type"], m["room"], m["from"], m["data"], m["offset"], m["epoch"])
            for m in page["messages"]] == [
        ("message", "hist:1", None, n, n + 1, epoch) for n in range(3)]
    status, page = await api.call(f"/api/history?room=hist:1&since=1&epoch={epoch}")
    assert status == 200 and [m["offset"] for m in page["messages"]] == [2, 3]
    status, page = await api.call("/api/history?room=hist:1&since=0&limit=1")
    assert status == 200 and [m["offset"] for m in page["messages"]] == [1]
    status, body = await api.call("/api/history?room=hist:1&since=1&epoch=not-it")
    assert status == 409 and body["error"] == "epoch"
    status, page = await api.call("/api/history?room=hist:never")
    assert status == 200 and page["offset"] == 0 and page["messages"] == []
    for path in ("/api/history?room=lobby", "/api/history?room=hist:1&since=-1",
                 "/api/history?room=hist:1&limit=0", "/api/history?room=hist:1&since=x",
                 "/api/history"):
        status, body = await api.call(path)
        assert status == 400 and body["error"] == "bad_request" and body["message"], path


# --- numbers a client sends are ASCII digits (issue 20, item 2) ---------------------


async def raw_api_answer(port: int, head: str) -> bytes:
    """Send ``head`` (a request without a body) as latin-1 bytes; the whole answer."""
    conn = await RawConnection.open(port, head.encode("latin-1"))
    answer = await conn.wait_eof()
    conn.discard()
    return answer


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [{}, WITH_KEY])
@pytest.mark.parametrize("length", ["\u00b2", "\u0663", "\uff11"])  # ², Arabic-Indic 3, fullwidth 1
async def test_a_non_ascii_content_length_is_4xx_key_or_not(
    api: Api, port: int, length: str
) -> None:
    # "²".isdigit() is True and int("²") raises; int("٣") is 3. Headers arrive as
    # latin-1, so only "²" survives the wire as itself; the others are mojibake.
    encoded = length if length == "\u00b2" else length.encode().decode("latin-1")
    answer = await raw_api_answer(
        port,
        f"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: {encoded}\r\n"
        "Connection: close\r\n\r\n",
    )
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:200]
    assert b"internal_error" not in answer
    assert counted(await api.metrics(), "publish", "internal_error") == 0


@pytest.mark.gen_test
@pytest.mark.parametrize("server_flags", [WITH_KEY])
@pytest.mark.parametrize("number", ["%C2%B2", "%D9%A3", "%EF%BC%91", "1%C2%B2", "-0", "0x1", "1_0", "1e3"])
@pytest.mark.parametrize("name", ["since", "limit"])
async def test_history_numbers_must_be_ascii_digits(api: Api, number: str, name: str) -> None:
    status, body = await api.call(f"/api/history?room=hist:1&{name}={number}")
    assert status == 400 and body["error"] == "bad_request", (status, body)
    assert name in body["message"]
    assert counted(await api.metrics(), "history", "internal_error") == 0
