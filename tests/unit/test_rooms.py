"""Room names, token grants and namespace policies: deny by default, look-alikes denied."""

from __future__ import annotations

from typing import Any

import pytest

from wsserver.errors import BadRequest, ConfigError, TokenInvalid
from wsserver.rooms import (
    NO_GRANTS,
    Grants,
    NamespacePolicy,
    RoomPolicy,
    namespace_of,
    validate_room,
)

# --- room names --------------------------------------------------------------


@pytest.mark.parametrize(
    ("room", "namespace"),
    [
        ("lobby", ""),
        ("a", ""),
        ("x" * 128, ""),
        ("chat:42", "chat"),
        ("chat:", "chat"),
        ("user:alice:x", "user"),
        ("dm:alice:bob", "dm"),
        ("a-b_c9:x", "a-b_c9"),
        ("n" * 32 + ":x", "n" * 32),
        ("general chat", ""),  # the ASCII space is printable
        ("café", ""),
        ("chat:Ünïcode ok", "chat"),
        ("rooms*", ""),
    ],
)
def test_valid_room_names(room: str, namespace: str) -> None:
    assert validate_room(room) == room
    assert namespace_of(room) == namespace


@pytest.mark.parametrize(
    ("room", "fragment"),
    [
        ("", "1 to 128"),
        ("x" * 129, "1 to 128"),
        (42, "string"),
        (None, "string"),
        (["chat"], "string"),
        ("a\nb", "printable"),
        ("a\tb", "printable"),
        ("a\x00", "printable"),
        ("a\x7f", "printable"),
        ("a\u200bb", "printable"),  # zero-width space (Cf)
        ("a\u202eb", "printable"),  # right-to-left override (Cf)
        ("a\u00a0b", "printable"),  # no-break space: only the ASCII space is allowed
        ("a\ud800", "printable"),  # lone surrogate, as json.loads can produce
        ("a\ue000", "printable"),  # private use
        ("a\U000e0001", "printable"),  # language tag (Cf)
        ("Chat:1", "namespace"),
        (":x", "namespace"),
        ("chat room:1", "namespace"),
        ("n" * 33 + ":x", "namespace"),
        ("ch.at:1", "namespace"),
        ("çhat:1", "namespace"),
    ],
)
def test_invalid_room_names(room: Any, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate_room(room)
    assert fragment in info.value.message
    assert info.value.code == "bad_request"


# --- token grants ------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "room", "granted"),
    [
        (["chat:1"], "chat:1", True),
        (["chat:1"], "chat:10", False),
        (["chat:1"], "chat:", False),
        (["chat:1"], "Chat:1", False),
        (["chat:*"], "chat:1", True),
        (["chat:*"], "chat:", True),
        (["chat:*"], "chatter", False),
        (["chat:*"], "chat", False),
        (["chat:*"], "chatroom:1", False),
        (["chat:*"], "xchat:1", False),
        (["chat*"], "chatter", True),
        (["chat"], "chatter", False),
        (["chat"], "chat", True),
        (["user:alice"], "user:alicex", False),
        (["user:alice"], "user:alice:x", False),
        (["user:alice"], "user:alice", True),
        (["user:alice*"], "user:alicex", True),
        (["*"], "anything at all", True),
        (["*"], "user:bob", True),
        ([], "lobby", False),
        (["a", "b:*", "c:d"], "c:d", True),
        (["a", "b:*", "c:d"], "b:", True),
        (["a", "b:*", "c:d"], "c:de", False),
        (["chat:a*", "chat:*"], "chat:b", True),  # the wider prefix wins, order aside
        (["chat:*", "chat:1"], "chat:1", True),
        (["*", "chat:1"], "x", True),
    ],
)
def test_grants_match_exact_names_and_prefixes_only(
    entries: list[str], room: str, granted: bool
) -> None:
    grants = Grants.from_claims({"rooms": entries, "publish": entries})
    assert grants.can_join(room) is granted
    assert grants.can_publish(room) is granted


def test_join_and_publish_grants_are_separate() -> None:
    grants = Grants.from_claims({"rooms": ["chat:*"], "publish": ["chat:news"]})
    assert grants.can_join("chat:1") and not grants.can_publish("chat:1")
    assert grants.can_publish("chat:news")
    only_publish = Grants.from_claims({"publish": ["*"]})
    assert only_publish.can_publish("x") and not only_publish.can_join("x")


def test_a_token_without_grants_shares_one_empty_grants() -> None:
    assert Grants.from_claims({"sub": "alice"}) is NO_GRANTS
    assert Grants.from_claims({"rooms": [], "publish": []}) is NO_GRANTS
    assert not NO_GRANTS.can_join("lobby") and not NO_GRANTS.can_publish("lobby")


def test_same_claims_compile_to_one_shared_object() -> None:
    first = Grants.from_claims({"rooms": ["chat:*", "lobby"]})
    second = Grants.from_claims({"rooms": ["chat:*", "lobby"]})
    assert first.join is second.join


def test_covered_entries_are_folded_into_the_covering_prefix() -> None:
    grants = Grants.from_claims({"rooms": ["chat:a*", "chat:*", "chat:1", "lobby", "chat:ab*"]})
    assert grants.join.prefixes == ("chat:",)
    assert grants.join.exact == frozenset({"lobby"})


@pytest.mark.parametrize(
    ("claims", "fragment"),
    [
        ({"rooms": "chat:*"}, "'rooms' must be a list of strings"),
        ({"rooms": None}, "'rooms' must be a list of strings"),
        ({"rooms": {"chat:*": True}}, "'rooms' must be a list of strings"),
        ({"publish": "*"}, "'publish' must be a list of strings"),
        ({"rooms": ["chat:1", 7]}, "'rooms' entry 1 is not a string"),
        ({"rooms": [True]}, "entry 0 is not a string"),
        ({"rooms": [["chat:1"]]}, "entry 0 is not a string"),
        ({"rooms": ["chat:*:x"]}, "entry 0 has a '*' before its end"),
        ({"rooms": ["ch*at"]}, "'*' before its end"),
        ({"rooms": ["*chat"]}, "'*' before its end"),
        ({"rooms": ["**"]}, "'*' before its end"),
        ({"rooms": ["chat:**"]}, "'*' before its end"),
        ({"publish": ["ok", ""]}, "'publish' entry 1 is empty"),
        ({"rooms": ["x" * 130]}, "longer than 129"),
        ({"rooms": ["x" * 129]}, "longer than 128"),
        ({"rooms": ["a\nb"]}, "not printable"),
        ({"rooms": ["a\u200b*"]}, "not printable"),
        ({"rooms": ["Chat:1"]}, "namespace"),
        ({"rooms": [":*"]}, "namespace"),
        ({"rooms": ["x"] * 1001}, "more than 1000 entries"),
    ],
)
def test_malformed_claims_make_the_token_invalid(claims: dict[str, Any], fragment: str) -> None:
    with pytest.raises(TokenInvalid) as info:
        Grants.from_claims(claims)
    assert fragment in info.value.reason
    assert info.value.code == 4001
    # The reason goes into a close frame: at most 123 bytes (RFC 6455 section 5.5).
    assert len(info.value.reason.encode()) <= 123


def test_the_largest_well_formed_claims_are_accepted() -> None:
    entries = [f"r{index}:" + "x" * 120 + "*" for index in range(1000)]
    grants = Grants.from_claims({"rooms": entries, "publish": ["x" * 128]})
    assert grants.can_join("r999:" + "x" * 120 + "tail")
    assert grants.can_publish("x" * 128)


# --- namespace policies --------------------------------------------------------

CONTRACT_TABLE: dict[str, Any] = {
    "join": "token",
    "publish": "token",
    "history_size": 0,
    "history_ttl": 300,
    "presence": False,
    "join_leave": False,
    "namespaces": {
        "chat": {
            "join": "anyone",
            "publish": "members",
            "history_size": 100,
            "presence": True,
            "join_leave": True,
        },
        "user": {"join": "owner", "publish": "none"},
        "ops": {"join": "none", "publish": "none"},
    },
}


@pytest.fixture
def policy() -> RoomPolicy:
    return RoomPolicy.from_table(CONTRACT_TABLE)


def test_defaults_are_the_contracts() -> None:
    default = NamespacePolicy()
    assert (default.join, default.publish) == ("token", "token")
    assert (default.history_size, default.history_ttl) == (0, 300)
    assert not default.presence and not default.join_leave
    assert RoomPolicy() == RoomPolicy.from_table({})
    assert RoomPolicy().default == default and not RoomPolicy().namespaces


def test_the_contract_example_parses(policy: RoomPolicy) -> None:
    chat = policy.namespaces["chat"]
    assert chat == NamespacePolicy("anyone", "members", 100, 300, True, True)
    # A declared namespace starts from the contract's defaults, not from [rooms].
    assert policy.namespaces["user"] == NamespacePolicy(join="owner", publish="none")


@pytest.mark.parametrize(
    ("room", "namespace"),
    [
        ("lobby", None),
        ("chat:1", "chat"),
        ("chat:", "chat"),
        ("chatter", None),
        ("chat", None),
        ("user:alice", "user"),
        ("news:1", None),  # undeclared: the default namespace's policy
        ("users:alice", None),
    ],
)
def test_policy_for(policy: RoomPolicy, room: str, namespace: str | None) -> None:
    expected = policy.namespaces[namespace] if namespace else policy.default
    assert policy.policy_for(room) is expected


ALICE = "alice"
NONE = NO_GRANTS
CHAT = Grants.from_claims({"rooms": ["lobby", "news:*"], "publish": ["lobby"]})
ALL = Grants.from_claims({"rooms": ["*"], "publish": ["*"]})


@pytest.mark.parametrize(
    ("user", "grants", "room", "allowed"),
    [
        # join = "token" (default namespace and undeclared namespaces)
        (ALICE, NONE, "lobby", False),
        (ALICE, CHAT, "lobby", True),
        (ALICE, CHAT, "lobby2", False),
        (ALICE, CHAT, "news:1", True),
        (ALICE, CHAT, "newsroom", False),
        (ALICE, ALL, "anything", True),
        # join = "anyone"
        (ALICE, NONE, "chat:1", True),
        # join = "none": not even a token granting everything
        (ALICE, ALL, "ops:1", False),
        # join = "owner": exactly the part after "user:"; token grants do not count
        (ALICE, NONE, "user:alice", True),
        (ALICE, ALL, "user:bob", False),
        (ALICE, NONE, "user:alicex", False),
        (ALICE, NONE, "user:alice:x", False),
        (ALICE, NONE, "user:Alice", False),
        (ALICE, NONE, "user:", False),
        (ALICE, NONE, "user:alice ", False),
        ("Alice", NONE, "user:alice", False),
        ("alice:x", NONE, "user:alice:x", True),
        ("alice:x", NONE, "user:alice", False),
        ("", NONE, "user:", False),
        ("user:alice", NONE, "user:alice", False),
        ("user:alice", NONE, "user:user:alice", True),
    ],
)
def test_can_join(
    policy: RoomPolicy, user: str, grants: Grants, room: str, allowed: bool
) -> None:
    assert policy.can_join(user, grants, room) is allowed


def test_owner_in_the_default_namespace_means_the_part_after_any_namespace() -> None:
    policy = RoomPolicy(NamespacePolicy(join="owner"))
    assert not policy.can_join("lobby", NO_GRANTS, "lobby")  # no ':' : nobody owns it
    assert policy.can_join("alice", NO_GRANTS, "home:alice")
    assert not policy.can_join("alice", ALL, "home:bob")


@pytest.mark.parametrize(
    ("grants", "room", "is_member", "allowed"),
    [
        # publish = "token"
        (CHAT, "lobby", True, True),
        (CHAT, "lobby", False, False),  # joining first is required
        (CHAT, "news:1", True, False),  # joined via 'rooms', but no 'publish' grant
        (NONE, "lobby", True, False),
        (ALL, "lobby", True, True),
        # publish = "members"
        (NONE, "chat:1", True, True),
        (NONE, "chat:1", False, False),
        # publish = "none": only the server API
        (ALL, "user:alice", True, False),
        (ALL, "ops:1", True, False),
    ],
)
def test_can_publish(
    policy: RoomPolicy, grants: Grants, room: str, is_member: bool, allowed: bool
) -> None:
    assert policy.can_publish(ALICE, grants, room, is_member) is allowed


def test_demo_policy_opens_the_default_namespace() -> None:
    demo = RoomPolicy.demo()
    assert demo.default == NamespacePolicy(join="anyone", publish="members")
    assert demo.can_join("bob", NO_GRANTS, "lobby")
    assert demo.can_publish("bob", NO_GRANTS, "lobby", is_member=True)
    assert not demo.can_publish("bob", NO_GRANTS, "lobby", is_member=False)
    assert demo != RoomPolicy()
    assert "join=anyone publish=members" in demo.describe()


def test_demo_policy_keeps_user_rooms_to_their_owner() -> None:
    demo = RoomPolicy.demo()
    assert demo.namespaces["user"] == NamespacePolicy(join="owner", publish="none")
    assert demo.can_join("alice", NO_GRANTS, "user:alice")
    assert not demo.can_join("bob", NO_GRANTS, "user:alice")
    assert not demo.can_publish("alice", NO_GRANTS, "user:alice", is_member=True)
    assert demo.describe().endswith("; user: join=owner publish=none")


def test_describe_is_one_line(policy: RoomPolicy) -> None:
    text = policy.describe()
    assert "\n" not in text
    assert text.startswith("default namespace join=token publish=token")
    assert "chat: join=anyone publish=members history=100/300s presence join_leave" in text
    assert "user: join=owner publish=none" in text


def test_policies_are_hashable_and_compare_by_value(policy: RoomPolicy) -> None:
    again = RoomPolicy.from_table(CONTRACT_TABLE)
    assert policy == again and hash(policy) == hash(again)
    with pytest.raises(TypeError):
        policy.namespaces["x"] = NamespacePolicy()  # type: ignore[index]


@pytest.mark.parametrize(
    "changes",
    [
        {"join": "everyone"},
        {"publish": "anyone"},
        {"history_size": -1},
        {"history_size": 10_001},
        {"history_ttl": 0},
        {"presence": 1},
    ],
)
def test_namespace_policy_refuses_bad_values(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NamespacePolicy(**changes)


def test_room_policy_refuses_bad_namespace_names() -> None:
    with pytest.raises(ValueError):
        RoomPolicy(namespaces={"Chat": NamespacePolicy()})


# --- the [rooms] table ---------------------------------------------------------


def problems_of(table: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        RoomPolicy.from_table(table)
    return info.value.problems


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"join": "everyone"},
         "rooms.join: unknown value 'everyone' (use token, anyone, owner, proxy or none)"),
        ({"publish": "anyone"},
         "rooms.publish: unknown value 'anyone' (use token, members, proxy or none)"),
        ({"namespaces": {"chat": {"join": "everyone"}}},
         "rooms.namespaces.chat.join: unknown value 'everyone' (use token, anyone, owner, proxy or none)"),
        ({"join": 1}, "rooms.join: expected a string (token, anyone, owner, proxy or none)"),
        ({"join": "Token"}, "rooms.join: unknown value 'Token'"),
        ({"joins": "token"}, "rooms.joins: unknown setting (use join, publish, history_size"),
        ({"namespaces": {"chat": {"namespaces": {}}}},
         "rooms.namespaces.chat.namespaces: unknown setting"),
        ({"history_size": "100"}, "rooms.history_size: expected an integer"),
        ({"history_size": 1.5}, "rooms.history_size: expected an integer"),
        ({"history_size": True}, "rooms.history_size: expected an integer"),
        ({"history_size": -1}, "rooms.history_size: must be 0..10000"),
        ({"history_size": 10_001}, "rooms.history_size: must be 0..10000"),
        ({"history_ttl": 0}, "rooms.history_ttl: must be a finite number of seconds above 0"),
        ({"history_ttl": float("inf")}, "rooms.history_ttl: must be a finite number"),
        ({"history_ttl": float("nan")}, "rooms.history_ttl: must be a finite number"),
        ({"history_ttl": "5m"}, "rooms.history_ttl: expected a number of seconds"),
        ({"presence": "yes"}, "rooms.presence: expected true or false"),
        ({"namespaces": {"chat": {"join_leave": 1}}},
         "rooms.namespaces.chat.join_leave: expected true or false"),
        ({"namespaces": {"Chat": {}}},
         "rooms.namespaces.Chat: namespace names are [a-z0-9_-]{1,32}"),
        ({"namespaces": {"n" * 33: {}}}, f"rooms.namespaces.{'n' * 33}: namespace names are"),
        ({"namespaces": {"chat": "anyone"}}, "rooms.namespaces.chat: expected a table"),
        ({"namespaces": ["chat"]}, "rooms.namespaces: expected a table"),
        ({"history_size": 1, "history-size": 2}, "rooms.history-size: given twice"),
    ],
)
def test_bad_tables_name_the_key(table: dict[str, Any], expected: str) -> None:
    found = problems_of(table)
    assert any(problem.startswith(expected) for problem in found), found


def test_every_problem_is_reported_at_once() -> None:
    found = problems_of(
        {
            "join": "everyone",
            "colour": "red",
            "namespaces": {"chat": {"publish": "all"}, "BAD": {}, "user": {"join": "owner"}},
        }
    )
    assert len(found) == 4, found
    assert any(p.startswith("rooms.colour:") for p in found)
    assert any(p.startswith("rooms.namespaces.chat.publish:") for p in found)


def test_not_a_table() -> None:
    assert problems_of("token") == ["rooms: expected a table"]


def test_dashes_and_floats_are_accepted() -> None:
    policy = RoomPolicy.from_table(
        {"history-size": 5, "history-ttl": 1.5, "join-leave": True, "namespaces": {"a-b_1": {}}}
    )
    assert policy.default == NamespacePolicy(history_size=5, history_ttl=1.5, join_leave=True)
    assert policy.namespaces["a-b_1"] == NamespacePolicy()
