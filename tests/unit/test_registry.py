"""ConnectionRegistry caps and RoomTable membership."""

import pytest

from wsserver.errors import ServerFull, TooManyForUser, TooManyFromAddress
from wsserver.registry import ConnectionRegistry, RoomTable


def test_server_cap_then_address_cap() -> None:
    registry: ConnectionRegistry[str] = ConnectionRegistry(3, 2, 10)
    registry.admit("a", "1.1.1.1")
    registry.admit("b", "1.1.1.1")
    with pytest.raises(TooManyFromAddress) as by_address:
        registry.check_admission("1.1.1.1")
    assert by_address.value.status == 429
    registry.check_admission("2.2.2.2")
    registry.admit("c", "2.2.2.2")
    with pytest.raises(ServerFull) as full:
        registry.check_admission("3.3.3.3")
    assert full.value.status == 503
    assert full.value.retry_after


def test_user_cap_and_removal_frees_slots() -> None:
    registry: ConnectionRegistry[str] = ConnectionRegistry(10, 10, 2)
    for conn in ("a", "b", "c"):
        registry.admit(conn, "1.1.1.1")
    registry.authenticate("a", "alice")
    registry.authenticate("b", "alice")
    with pytest.raises(TooManyForUser) as info:
        registry.authenticate("c", "alice")
    assert info.value.code == 4008
    assert registry.remove("a") is None
    registry.authenticate("c", "alice")
    assert registry.count_for_user("alice") == 2


def test_remove_is_idempotent_and_reports_last_connection() -> None:
    registry: ConnectionRegistry[str] = ConnectionRegistry(10, 10, 10)
    registry.admit("a", "1.1.1.1")
    registry.authenticate("a", "alice")
    assert registry.remove("a") == "alice"
    assert registry.remove("a") is None
    assert registry.total == registry.authenticated == registry.users == 0
    assert registry.count_for_address("1.1.1.1") == 0


def test_unauthenticated_connection_counts_for_server_and_address() -> None:
    registry: ConnectionRegistry[str] = ConnectionRegistry(1, 1, 1)
    registry.admit("a", "1.1.1.1")
    assert registry.total == 1
    assert registry.authenticated == 0
    with pytest.raises(ServerFull):
        registry.check_admission("2.2.2.2")
    registry.remove("a")
    registry.check_admission("2.2.2.2")


def test_rooms_both_ways() -> None:
    rooms: RoomTable[str] = RoomTable(max_rooms_per_member=2)
    assert rooms.join("a", "r1")
    assert not rooms.join("a", "r1")
    rooms.join("b", "r1")
    rooms.join("a", "r2")
    assert rooms.members("r1") == ["a", "b"]
    with pytest.raises(ValueError):
        rooms.join("a", "r3")
    rooms.leave_all("a")
    assert rooms.members("r1") == ["b"]
    assert rooms.members("r2") == []
    assert len(rooms) == 1
    assert not rooms.leave("a", "r1")
