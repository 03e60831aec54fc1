"""Message parsing: every malformed input is a BadRequest or UnknownType."""

import pytest

from wsserver.errors import BadRequest, UnknownType
from wsserver.protocol import client_idempotency_key, encode, parse, salvage_id

DEEP = "[" * 40 + "]" * 40
VERY_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("text", "expected_type", "expected_id"),
    [
        ('{"type": "ping"}', "ping", None),
        ('{"type": "ping", "id": 7}', "ping", 7),
        ('{"type": "ping", "id": "abc"}', "ping", "abc"),
        ('{"type": "ping", "id": 1.5}', "ping", 1.5),
        ('{"type": "echo", "data": null}', "echo", None),
        ('{"type": "echo", "data": {"nested": [1, 2, {"x": "y"}]}}', "echo", None),
        ('{"type": "join", "room": "lobby"}', "join", None),
        ('{"type": "leave", "room": "lobby"}', "leave", None),
        ('{"type": "publish", "room": "r", "data": "hi"}', "publish", None),
        ('{"type": "publish", "room": "r", "data": 1, "idempotency_key": "' + "k" * 128 + '"}',
         "publish", None),
        ('{"type": "task", "name": "primes", "args": {"limit": 10}}', "task", None),
        ('{"type": "task", "name": "primes"}', "task", None),
        ('{"type": "refresh", "token": "a.b.c"}', "refresh", None),
        ('{"type": "ping", "extra": "ignored"}', "ping", None),
        ('{"type": "join", "room": "r", "since": {"offset": 0, "epoch": "e"}}', "join", None),
        ('{"type": "join", "room": "r", "since": {"offset": 9223372036854775807, "epoch": "e"}}',
         "join", None),
        ('{"type": "rpc", "method": "orders.list", "data": {"page": 2}, "id": 9}', "rpc", 9),
        ('{"type": "rpc", "method": "m"}', "rpc", None),
        ('{"type": "join", "room": "r", "token": "a.b.c", "data": [1]}', "join", None),
    ],
)
def test_valid_messages(text: str, expected_type: str, expected_id: object) -> None:
    msg = parse(text)
    assert msg.type == expected_type
    assert msg.id == expected_id


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        '{"type": "rpc"}',
        '{"type": "rpc", "method": ""}',
        '{"type": "rpc", "method": 5}',
        '{"type": "rpc", "method": "' + "m" * 129 + '"}',
        '{"type": "join", "room": "r", "token": 5}',
        '{"type": "join", "room": "r", "token": ""}',
        "{",
        '{"type": "ping"',
        "[]",
        '"ping"',
        "42",
        "null",
        '{"type": 5}',
        '{"no_type": true}',
        '{"type": "ping", "id": true}',
        '{"type": "ping", "id": [1]}',
        '{"type": "ping", "id": {"a": 1}}',
        '{"type": "ping", "id": "' + "x" * 200 + '"}',
        '{"type": "echo"}',
        '{"type": "echo", "data": NaN}',
        '{"type": "echo", "data": Infinity}',
        '{"type": "echo", "data": -Infinity}',
        '{"type": "echo", "data": ' + "9" * 5000 + "}",
        '{"type": "echo", "data": ' + DEEP + "}",
        VERY_DEEP,
        '{"type": "join"}',
        # History offsets are 64-bit signed in every broker: beyond is no position.
        '{"type": "join", "room": "r", "since": {"offset": 9223372036854775808, "epoch": "e"}}',
        '{"type": "join", "room": "r", "since": {"offset": 18446744073709551616, "epoch": "e"}}',
        '{"type": "join", "room": "r", "since": {"offset": -1, "epoch": "e"}}',
        '{"type": "join", "room": "r", "since": {"offset": 1.5, "epoch": "e"}}',
        '{"type": "join", "room": "r", "since": {"offset": "1", "epoch": "e"}}',
        '{"type": "join", "room": 5}',
        '{"type": "join", "room": ""}',
        '{"type": "join", "room": "' + "r" * 129 + '"}',
        '{"type": "publish", "room": "r"}',
        '{"type": "publish", "data": 1}',
        '{"type": "publish", "room": "r", "data": 1, "idempotency_key": ""}',
        '{"type": "publish", "room": "r", "data": 1, "idempotency_key": 5}',
        '{"type": "publish", "room": "r", "data": 1, "idempotency_key": "' + "k" * 129 + '"}',
        '{"type": "task"}',
        '{"type": "task", "name": 5}',
        '{"type": "task", "name": "primes", "args": [1]}',
        '{"type": "refresh"}',
        '{"type": "refresh", "token": ""}',
        '{"type": "refresh", "token": 5}',
        "\ud800",
    ],
)
def test_bad_requests(text: str) -> None:
    with pytest.raises(BadRequest):
        parse(text)


def test_unknown_type() -> None:
    with pytest.raises(UnknownType):
        parse('{"type": "subscribe"}')


def test_nesting_just_under_the_limit_is_fine() -> None:
    parse('{"type": "echo", "data": ' + "[" * 30 + "]" * 30 + "}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type": "echo", "id": 3}', 3),
        ('{"type": "nope", "id": "x"}', "x"),
        ('{"id": true}', None),
        ("not json", None),
        ("[1]", None),
    ],
)
def test_salvage_id(text: str, expected: object) -> None:
    assert salvage_id(text) == expected


def test_encode_is_compact_utf8() -> None:
    assert encode({"type": "echo", "data": "é"}) == '{"type":"echo","data":"é"}'.encode()


# --- input no reply can carry (issue 13, item 5) -----------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "ping", "id": "\\ud800"}',
        '{"type": "ping", "id": 1e400}',
        '{"type": "ping", "id": -1e400}',
        '{"type": "echo", "data": {"\\udfff": 1}}',
        '{"type": "echo", "data": ["ok", ["\\ud83d"]]}',
        '{"type": "echo", "data": 1.5e309}',
    ],
)
def test_unencodable_input_is_a_bad_request(text: str) -> None:
    with pytest.raises(BadRequest):
        parse(text)
    assert salvage_id(text) is None


def test_surrogate_pairs_and_big_finite_numbers_are_fine() -> None:
    msg = parse('{"type": "echo", "id": 1e308, "data": "\\ud83d\\ude00 \\\\ud800"}')
    assert msg.id == 1e308 and msg.field("data") == "\U0001f600 \\ud800"
    assert encode({"data": msg.field("data")})


def test_a_message_refused_for_a_lone_surrogate_keeps_its_id() -> None:
    text = '{"type": "echo", "id": 9, "data": "\\ud800"}'
    with pytest.raises(BadRequest, match="valid Unicode"):
        parse(text)
    assert salvage_id(text) == 9


def test_a_client_idempotency_key_is_its_users_own() -> None:
    """Keys of different users (or of the server API) never name the same broker key,
    however the user names and keys are chosen."""
    keys = {client_idempotency_key("a", "b:c"), client_idempotency_key("a:b", "c"),
            client_idempotency_key("ab", "c"), "b:c"}
    assert len(keys) == 4
