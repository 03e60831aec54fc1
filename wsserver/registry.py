"""Who is connected: counts and caps, and room membership.

Single-threaded by design (the Tornado loop): a check and the registration
that follows it run in one callback, so counts cannot race.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from wsserver.errors import ServerFull, TooManyForUser, TooManyFromAddress, TooManyUnverified

C = TypeVar("C", bound=Hashable)

#: What a client should wait before retrying a full server, in seconds.
SERVER_FULL_RETRY_AFTER = 5.0


class Reservation:
    """A registry slot held for a handshake that has passed its checks."""

    __slots__ = ("verified",)

    def __init__(self) -> None:
        self.verified = True


class ConnectionRegistry(Generic[C]):
    """Open connections, counted for the whole server, per address, per user.

    A connection is *admitted* (it counts for its address) when it is
    upgraded, and *authenticated* (it counts for its user) once its token is
    verified. Admitted connections are counted in two pools of their own:
    *verified* ones against ``max_total``, and *unverified* ones (a token that
    failed, or a user over its cap, waiting for their close) against
    ``max_unverified``. Garbage tokens therefore fill only the small unverified
    pool and never crowd verified users out of ``max_total``.
    """

    def __init__(
        self, max_total: int, max_per_address: int, max_per_user: int, max_unverified: int = 64
    ) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.max_per_user = max_per_user
        self.max_unverified = max_unverified
        self._address: dict[C, str] = {}
        #: Handshakes counted between their checks and their upgrade.
        self._reserved: dict[Reservation, str] = {}
        self._reserved_unverified = 0
        self._user: dict[C, str] = {}
        self._unverified: set[C] = set()
        self._per_address: Counter[str] = Counter()
        self._per_user: dict[str, set[C]] = {}

    def check_admission(self, address: str, verified: bool = True) -> None:
        """Raise if one more connection from ``address`` is not allowed.

        Args:
            verified: whether the connection's token passed verification; an
                unverified one is counted against ``max_unverified`` instead
                of ``max_total``.

        Raises:
            ServerFull: the server is at ``max_total`` (or, for an unverified
                connection, at ``max_unverified``).
            TooManyFromAddress: ``address`` is at ``max_per_address``.
        """
        if self.verified >= self.max_total:
            raise ServerFull("server at its connection limit", SERVER_FULL_RETRY_AFTER)
        if not verified and len(self._unverified) >= self.max_unverified:
            raise TooManyUnverified(
                "too many connections with a rejected token", SERVER_FULL_RETRY_AFTER
            )
        if self._per_address[address] >= self.max_per_address:
            raise TooManyFromAddress(f"too many connections from {address}")

    def admit(self, conn: C, address: str, verified: bool = True) -> None:
        """Count ``conn`` for ``address`` and its pool (idempotent)."""
        if conn in self._address:
            return
        self._address[conn] = address
        self._per_address[address] += 1
        if not verified:
            self._unverified.add(conn)

    def reserve(self, address: str, verified: bool = True) -> Reservation:
        """Count a connection that is not built yet (a handshake between its
        checks and its upgrade), in the same step as :meth:`check_admission`.

        Hand it to the connection with :meth:`transfer`, or give it back with
        :meth:`release`.
        """
        reservation = Reservation()
        self._reserved[reservation] = address
        self._per_address[address] += 1
        if not verified:
            self._reserved_unverified += 1
            reservation.verified = False
        return reservation

    def transfer(self, reservation: Reservation, conn: C) -> None:
        """``conn`` takes ``reservation``'s place (its address and its pool)."""
        address = self._reserved.pop(reservation, None)
        if address is None:
            return
        if not reservation.verified:
            self._reserved_unverified -= 1
        self._address[conn] = address
        if not reservation.verified:
            self._unverified.add(conn)

    def release(self, reservation: Reservation) -> None:
        """Give a reservation back (the upgrade never happened); idempotent."""
        address = self._reserved.pop(reservation, None)
        if address is None:
            return
        if not reservation.verified:
            self._reserved_unverified -= 1
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]

    def demote(self, conn: C) -> None:
        """Count an admitted ``conn`` as unverified from now on (it is being
        refused, for example over its user's cap, and only waits for its close)."""
        if conn in self._address and conn not in self._user:
            self._unverified.add(conn)

    def authenticate(self, conn: C, user: str) -> None:
        """Count an admitted ``conn`` for ``user``.

        Raises:
            TooManyForUser: ``user`` is at ``max_per_user``.
        """
        conns = self._per_user.get(user)
        if conns is not None and len(conns) >= self.max_per_user:
            raise TooManyForUser()
        self._per_user.setdefault(user, set()).add(conn)
        self._user[conn] = user

    def remove(self, conn: C) -> str | None:
        """Forget ``conn`` (idempotent).

        Returns:
            its user when that was the user's last connection, else None.
        """
        address = self._address.pop(conn, None)
        self._unverified.discard(conn)
        if address is not None:
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]
        user = self._user.pop(conn, None)
        if user is None:
            return None
        conns = self._per_user[user]
        conns.discard(conn)
        if conns:
            return None
        del self._per_user[user]
        return user

    @property
    def total(self) -> int:
        """Admitted connections (authenticated or not yet)."""
        return len(self._address)

    @property
    def authenticated(self) -> int:
        return len(self._user)

    @property
    def verified(self) -> int:
        """Admitted (and reserved) connections counted against ``max_total``."""
        reserved = len(self._reserved) - self._reserved_unverified
        return len(self._address) - len(self._unverified) + reserved

    @property
    def unverified(self) -> int:
        """Admitted connections refused after the upgrade, not yet closed."""
        return len(self._unverified) + self._reserved_unverified

    @property
    def users(self) -> int:
        return len(self._per_user)

    def count_for_address(self, address: str) -> int:
        return self._per_address.get(address, 0)

    def count_for_user(self, user: str) -> int:
        return len(self._per_user.get(user, ()))

    def connections_of(self, user: str) -> list[C]:
        """``user``'s authenticated connections on this node."""
        return list(self._per_user.get(user, ()))

    def user_names(self) -> list[str]:
        """Every user with an authenticated connection on this node."""
        return list(self._per_user)

    def __iter__(self) -> Iterator[C]:
        return iter(list(self._address))
