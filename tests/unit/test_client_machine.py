"""wsserver.client's protocol state without sockets: server frames in, events out.

Each test scripts what a server sends (as text frames) and checks what the
client would do: which request a reply settles, what a room delivers and in
which order, what a reconnect re-joins, what is reported lost.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from wsserver.client.errors import (
    BadRequest,
    ConnectionLost,
    Forbidden,
    RateLimited,
    ServerError,
    TaskTimeout,
    Unavailable,
    UnknownType,
)
from wsserver.client.machine import (
    ClientMachine,
    Delivered,
    Event,
    Joined,
    JoinRefused,
    Replied,
    RequestFailed,
    RoomLeft,
    TokenExpiring,
    Unsolicited,
    Welcomed,
)
from wsserver.client.messages import Gap, Message, Position

ROOM = "chat:1"
WELCOME: dict[str, Any] = {"type": "welcome", "user": "alice", "expires_at": 2_000_000_000,
           "limits": {"message_rate": 10.0, "message_burst": 20}}


def feed(machine: ClientMachine, *messages: dict[str, Any]) -> list[Event]:
    events: list[Event] = []
    for msg in messages:
        events += machine.receive(json.dumps(msg))
    return events


def delivered(events: list[Event]) -> list[str]:
    """The room items in order: 'm<offset>' for a message, '<kind>@<offset>' for a gap."""
    out = []
    for event in events:
        if isinstance(event, Delivered):
            item = event.item
            if isinstance(item, Message):
                out.append(f"m{item.offset}" if item.offset is not None else f"m:{item.data}")
            else:
                out.append(f"{item.kind}@{item.offset if item.offset is not None else item.dropped}")
    return out


def msg_at(offset: int, epoch: str = "e1", room: str = ROOM, **extra: Any) -> dict[str, Any]:
    return {"type": "message", "room": room, "from": "bob", "data": f"d{offset}",
            "offset": offset, "epoch": epoch, **extra}


def joined_in(machine: ClientMachine, top: int = 4, epoch: str = "e1") -> ClientMachine:
    """``machine`` welcomed and in ROOM at (epoch, top)."""
    feed(machine, WELCOME)
    join = machine.join(ROOM)
    feed(machine, {"type": "joined", "room": ROOM, "epoch": epoch, "offset": top,
                   "id": join["id"]})
    return machine


def reconnected(machine: ClientMachine) -> dict[str, Any]:
    """Drop the connection, welcome again; the one re-join sent."""
    machine.connection_lost()
    feed(machine, WELCOME)
    rejoins = machine.rejoins()
    assert len(rejoins) == 1
    return rejoins[0]


# --- requests -------------------------------------------------------------------------


def test_welcome_says_who_and_what_limits() -> None:
    machine = ClientMachine()
    events = feed(machine, WELCOME)
    assert events == [Welcomed("alice", 2_000_000_000.0, WELCOME["limits"])]
    assert (machine.user, machine.expires_at) == ("alice", 2_000_000_000.0)
    assert machine.rejoins() == []


def test_a_reply_settles_the_request_with_its_id() -> None:
    machine = ClientMachine()
    feed(machine, WELCOME)
    first = machine.request({"type": "echo", "data": 1})
    second = machine.request({"type": "echo", "data": 2})
    assert first["id"] != second["id"]
    assert machine.in_flight == 2
    events = feed(machine, {"type": "echo", "data": 2, "id": second["id"]})
    assert events == [Replied(second["id"], {"type": "echo", "data": 2, "id": second["id"]})]
    assert machine.in_flight == 1


@pytest.mark.parametrize(("code", "cls"), [
    ("bad_request", BadRequest), ("forbidden", Forbidden), ("unknown_type", UnknownType),
    ("rate_limited", RateLimited), ("timeout", TaskTimeout), ("unavailable", Unavailable),
    ("something_new", ServerError),
])
def test_an_error_reply_fails_the_request_with_a_typed_error(code: str,
                                                           cls: type[ServerError]) -> None:
    machine = ClientMachine()
    feed(machine, WELCOME)
    request = machine.request({"type": "rpc", "method": "m", "data": None})
    reply = {"type": "error", "code": code, "message": "no", "retry_after": 1.5,
             "id": request["id"]}
    [event] = feed(machine, reply)
    assert isinstance(event, RequestFailed)
    assert type(event.error) is cls
    assert isinstance(event.error, ServerError)
    assert (event.error.code, event.error.retry_after, event.error.reply) == (code, 1.5, reply)


def test_an_error_nobody_waits_for_is_unsolicited() -> None:
    machine = ClientMachine()
    feed(machine, WELCOME)
    error = {"type": "error", "code": "bad_request", "message": "not JSON"}
    assert feed(machine, error) == [Unsolicited(error)]


def test_what_is_not_a_json_object_is_ignored() -> None:
    machine = ClientMachine()
    assert machine.receive("not json") == []
    assert machine.receive("[1, 2]") == []
    assert machine.receive('{"no": "type"}') == []


def test_a_dropped_connection_fails_what_was_sent_but_not_the_joins() -> None:
    machine = joined_in(ClientMachine())
    echo = machine.request({"type": "echo", "data": 1})
    publish = machine.request({"type": "publish", "room": ROOM, "data": 1}, "publish")
    machine.leave("other")  # a leave in flight fails too
    join = machine.join("chat:2")
    events = machine.connection_lost()
    failed = {e.id for e in events if isinstance(e, RequestFailed)}
    assert echo["id"] in failed and publish["id"] in failed
    assert join["id"] not in failed
    assert all(isinstance(e, RequestFailed) and isinstance(e.error, ConnectionLost)
               for e in events)
    assert machine.in_flight == 0
    # Both rooms are joined again on the next connection.
    feed(machine, WELCOME)
    assert sorted(j["room"] for j in machine.rejoins()) == [ROOM, "chat:2"]


def test_a_publish_is_answered_by_the_senders_own_copy() -> None:
    machine = joined_in(ClientMachine())
    publish = machine.request({"type": "publish", "room": ROOM, "data": "hi"}, "publish")
    copy = {**msg_at(5), "from": "alice", "id": publish["id"]}
    events = feed(machine, copy)
    assert events[0] == Replied(publish["id"], copy)
    assert delivered(events) == ["m5"]


def test_a_repeated_idempotency_key_is_answered_published_and_delivers_nothing() -> None:
    machine = joined_in(ClientMachine())
    publish = machine.request({"type": "publish", "room": ROOM, "data": "hi",
                               "idempotency_key": "k"}, "publish")
    answer = {"type": "published", "room": ROOM, "duplicate": True, "offset": 5,
              "epoch": "e1", "id": publish["id"]}
    assert feed(machine, answer) == [Replied(publish["id"], answer)]
    assert machine.in_flight == 0
    # Not a reply to anything of ours: handed to the application as it came.
    stray = {**answer, "id": "c99"}
    assert feed(machine, stray) == [Unsolicited(stray)]


def test_refreshed_sets_the_new_expiry_and_token_expiring_asks_for_one() -> None:
    machine = ClientMachine()
    feed(machine, WELCOME)
    assert feed(machine, {"type": "token_expiring", "expires_at": 2_000_000_000}) == [
        TokenExpiring(2_000_000_000.0)]
    refresh = machine.request({"type": "refresh", "token": "t"}, "refresh")
    [event] = feed(machine, {"type": "refreshed", "expires_at": 2_000_000_900,
                             "id": refresh["id"]})
    assert isinstance(event, Replied)
    assert machine.expires_at == 2_000_000_900.0


# --- rooms: delivery, order, repeats ---------------------------------------------------


def test_a_joined_room_delivers_in_order_and_tracks_its_position() -> None:
    machine = ClientMachine()
    feed(machine, WELCOME)
    join = machine.join(ROOM)
    events = feed(machine, {"type": "joined", "room": ROOM, "epoch": "e1", "offset": 4,
                            "id": join["id"]}, msg_at(5), msg_at(6))
    assert events[0] == Joined(ROOM, join["id"], events[0].reply, None, 0)  # type: ignore[union-attr]
    assert delivered(events) == ["m5", "m6"]
    assert machine.position(ROOM) == Position("e1", 6)


def test_messages_of_rooms_we_are_not_in_are_dropped() -> None:
    machine = joined_in(ClientMachine())
    assert feed(machine, msg_at(1, room="chat:other")) == []


def test_a_room_without_history_delivers_everything_and_keeps_no_position() -> None:
    machine = ClientMachine()
    feed(machine, WELCOME)
    join = machine.join("lobby")
    events = feed(machine, {"type": "joined", "room": "lobby", "id": join["id"]},
                  {"type": "message", "room": "lobby", "from": "bob", "data": "x"},
                  {"type": "message", "room": "lobby", "from": "bob", "data": "x"})
    assert delivered(events) == ["m:x", "m:x"]
    assert machine.position("lobby") is None
    machine.connection_lost()
    feed(machine, WELCOME)
    assert machine.rejoins()[0] == {"type": "join", "room": "lobby", "id": "c2"}


def test_after_a_reconnect_the_room_is_rejoined_since_its_position() -> None:
    machine = joined_in(ClientMachine())
    feed(machine, msg_at(5), msg_at(6))
    rejoin = reconnected(machine)
    assert rejoin["since"] == {"offset": 6, "epoch": "e1"}


def test_a_recovered_rejoin_delivers_what_was_missed_then_what_waited_without_repeats() -> None:
    machine = joined_in(ClientMachine())
    feed(machine, msg_at(5))
    rejoin = reconnected(machine)
    # Live messages of the room before the joined reply wait behind it.
    early = feed(machine, msg_at(8), msg_at(9))
    assert early == []
    events = feed(machine, {"type": "joined", "room": ROOM, "epoch": "e1", "offset": 8,
                            "recovered": True, "messages": [msg_at(6), msg_at(7), msg_at(8)],
                            "id": rejoin["id"]})
    assert isinstance(events[0], Joined) and events[0].recovered is True
    assert events[0].missed == 3
    assert delivered(events) == ["m6", "m7", "m8", "m9"]  # 8 once, though it came twice
    assert delivered(feed(machine, msg_at(9), msg_at(10))) == ["m10"]


def test_a_failed_recovery_is_reported_before_anything_after_it() -> None:
    machine = joined_in(ClientMachine())
    feed(machine, msg_at(5))
    rejoin = reconnected(machine)
    reply = {"type": "joined", "room": ROOM, "epoch": "e2", "offset": 3, "recovered": False,
             "messages": [], "id": rejoin["id"]}
    events = feed(machine, reply, msg_at(4, "e2"))
    assert isinstance(events[0], Joined) and events[0].recovered is False
    assert delivered(events) == ["recovery_failed@3", "m4"]
    gap = events[1].item  # type: ignore[union-attr]
    assert isinstance(gap, Gap) and (gap.epoch, gap.raw) == ("e2", reply)


def test_a_first_join_since_a_stored_position_reports_a_failed_recovery_too() -> None:
    machine = ClientMachine()
    feed(machine, WELCOME)
    join = machine.join(ROOM, since=Position("e0", 100))
    assert join["since"] == {"offset": 100, "epoch": "e0"}
    events = feed(machine, {"type": "joined", "room": ROOM, "epoch": "e1", "offset": 2,
                            "recovered": False, "messages": [], "id": join["id"]})
    assert delivered(events) == ["recovery_failed@2"]


def test_a_partial_recovery_takes_the_pending_messages_by_offset() -> None:
    """Round 3: ``joined`` carries part of what was missed plus ``pending``;
    the rest follows as ordinary messages before any live one."""
    machine = joined_in(ClientMachine())
    feed(machine, msg_at(5))
    rejoin = reconnected(machine)
    events = feed(machine, {"type": "joined", "room": ROOM, "epoch": "e1", "offset": 12,
                            "recovered": True, "messages": [msg_at(6), msg_at(7)],
                            "pending": 5, "id": rejoin["id"]})
    assert isinstance(events[0], Joined) and (events[0].missed, events[0].pending) == (7, 5)
    assert delivered(events) == ["m6", "m7"]
    events = feed(machine, *(msg_at(n) for n in range(8, 15)))
    assert delivered(events) == [f"m{n}" for n in range(8, 15)]


def test_a_message_past_the_pending_range_waits_for_it() -> None:
    machine = joined_in(ClientMachine())
    feed(machine, msg_at(5))
    rejoin = reconnected(machine)
    feed(machine, {"type": "joined", "room": ROOM, "epoch": "e1", "offset": 9,
                   "recovered": True, "messages": [msg_at(6)], "pending": 3,
                   "id": rejoin["id"]})
    # 10 comes before the last pending one (9): held, not a hole.
    events = feed(machine, msg_at(7), msg_at(8), msg_at(10))
    assert delivered(events) == ["m7", "m8"]
    assert delivered(feed(machine, msg_at(9))) == ["m9", "m10"]


def test_a_gap_of_the_server_moves_the_position_and_is_delivered_in_place() -> None:
    machine = joined_in(ClientMachine())
    gap = {"type": "gap", "room": ROOM, "epoch": "e1", "offset": 9, "recovered": False}
    events = feed(machine, msg_at(5), gap, msg_at(10))
    assert delivered(events) == ["m5", "gap@9", "m10"]
    assert machine.position(ROOM) == Position("e1", 10)


def test_a_gap_below_the_position_loses_nothing_and_is_not_delivered() -> None:
    machine = joined_in(ClientMachine(), top=12)
    gap = {"type": "gap", "room": ROOM, "epoch": "e1", "offset": 9, "recovered": False}
    assert feed(machine, gap) == []


def test_a_gap_of_a_room_without_history_says_how_many_were_dropped() -> None:
    machine = ClientMachine()
    feed(machine, WELCOME)
    join = machine.join("lobby")
    events = feed(machine, {"type": "joined", "room": "lobby", "id": join["id"]},
                  {"type": "gap", "room": "lobby", "dropped": 7})
    assert delivered(events) == ["gap@7"]


def test_a_gap_during_a_recovering_join_keeps_its_place_after_the_recovered() -> None:
    machine = joined_in(ClientMachine())
    feed(machine, msg_at(5))
    rejoin = reconnected(machine)
    gap = {"type": "gap", "room": ROOM, "epoch": "e1", "offset": 20, "recovered": False}
    assert feed(machine, gap, msg_at(21)) == []
    events = feed(machine, {"type": "joined", "room": ROOM, "epoch": "e1", "offset": 6,
                            "recovered": True, "messages": [msg_at(6)], "id": rejoin["id"]})
    assert delivered(events) == ["m6", "gap@20", "m21"]


def test_a_silent_jump_is_reported_as_a_hole() -> None:
    """The server promises a ``gap`` for anything lost; a jump without one is
    reported rather than passed over."""
    machine = joined_in(ClientMachine())
    events = feed(machine, msg_at(5), msg_at(8), msg_at(1, "e2"))
    assert delivered(events) == ["m5", "hole@7", "m8", "hole@0", "m1"]


# --- rooms: leaving, refusals ------------------------------------------------------------


def test_the_server_removing_us_from_a_room_is_an_event_and_ends_its_delivery() -> None:
    machine = joined_in(ClientMachine())
    events = feed(machine, {"type": "left", "room": ROOM, "reason": "forbidden"}, msg_at(5))
    assert events == [RoomLeft(ROOM, "forbidden")]
    assert ROOM not in machine.rooms


def test_leaving_forgets_the_room_at_once_and_its_reply_settles_the_leave() -> None:
    machine = joined_in(ClientMachine())
    leave = machine.leave(ROOM)
    events = feed(machine, msg_at(5), {"type": "left", "room": ROOM, "id": leave["id"]})
    assert events == [Replied(leave["id"], {"type": "left", "room": ROOM, "id": leave["id"]})]
    machine.connection_lost()
    feed(machine, WELCOME)
    assert machine.rejoins() == []


def test_a_refused_first_join_forgets_the_room() -> None:
    machine = ClientMachine()
    feed(machine, WELCOME)
    join = machine.join(ROOM)
    [event] = feed(machine, {"type": "error", "code": "forbidden", "message": "no",
                             "id": join["id"]})
    assert isinstance(event, JoinRefused) and isinstance(event.error, Forbidden)
    assert (event.retry, event.dropped, event.rejoin) == (False, True, False)
    assert ROOM not in machine.rooms


def test_a_rejoin_refused_as_unavailable_is_retried_from_the_same_position() -> None:
    machine = joined_in(ClientMachine())
    feed(machine, msg_at(5))
    rejoin = reconnected(machine)
    [event] = feed(machine, {"type": "error", "code": "unavailable", "message": "broker down",
                             "id": rejoin["id"]})
    assert isinstance(event, JoinRefused)
    assert (event.retry, event.dropped, event.rejoin) == (True, False, True)
    again = machine.rejoin(ROOM)
    assert again is not None and again["since"] == {"offset": 5, "epoch": "e1"}
    assert machine.rejoin(ROOM) is None  # one in flight is enough


def test_a_rejoin_refused_as_forbidden_loses_the_room() -> None:
    machine = joined_in(ClientMachine())
    rejoin = reconnected(machine)
    [event] = feed(machine, {"type": "error", "code": "forbidden", "message": "no",
                             "id": rejoin["id"]})
    assert isinstance(event, JoinRefused)
    assert (event.retry, event.dropped, event.rejoin) == (False, True, True)
    assert machine.rejoin(ROOM) is None
