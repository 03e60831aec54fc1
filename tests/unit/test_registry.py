"""ConnectionRegistry caps."""

import pytest

from wsserver.errors import ServerFull, TooManyForUser, TooManyFromAddress, TooManyUnverified
from wsserver.registry import ConnectionRegistry


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


def test_unverified_connections_do_not_crowd_out_verified_ones() -> None:
    reg: ConnectionRegistry[str] = ConnectionRegistry(2, 100, 10, max_unverified=3)
    for n in range(3):
        reg.check_admission(f"10.0.0.{n}", verified=False)
        reg.admit(f"bad{n}", f"10.0.0.{n}", verified=False)
    with pytest.raises(TooManyUnverified) as info:
        reg.check_admission("10.0.0.9", verified=False)
    assert info.value.status == 503 and info.value.reason == "unverified_full"
    # The verified pool is untouched: both verified users still get in.
    for user in ("alice", "bob"):
        reg.check_admission("10.1.0.1")
        reg.admit(user, "10.1.0.1")
        reg.authenticate(user, user)
    assert (reg.verified, reg.unverified, reg.total) == (2, 3, 5)
    with pytest.raises(ServerFull):
        reg.check_admission("10.1.0.1")
    # A full server refuses a bad token too, as the contract's order says.
    reg.remove("bad0")
    with pytest.raises(ServerFull) as full:
        reg.check_admission("10.0.0.0", verified=False)
    assert not isinstance(full.value, TooManyUnverified)


def test_unverified_count_per_address_and_removal() -> None:
    reg: ConnectionRegistry[str] = ConnectionRegistry(10, 2, 10, max_unverified=5)
    reg.admit("bad", "a", verified=False)
    reg.admit("good", "a")
    with pytest.raises(TooManyFromAddress):
        reg.check_admission("a", verified=False)
    assert reg.remove("bad") is None
    assert (reg.unverified, reg.verified, reg.count_for_address("a")) == (0, 1, 1)


def test_demote_moves_a_refused_connection_to_the_unverified_pool() -> None:
    reg: ConnectionRegistry[str] = ConnectionRegistry(10, 10, 1, max_unverified=5)
    reg.admit("a1", "x")
    reg.authenticate("a1", "alice")
    reg.admit("a2", "x")
    with pytest.raises(TooManyForUser):
        reg.authenticate("a2", "alice")
    reg.demote("a2")
    reg.demote("a1")  # authenticated: stays verified
    assert (reg.verified, reg.unverified) == (1, 1)
    reg.remove("a2")
    assert (reg.verified, reg.unverified) == (1, 0)
