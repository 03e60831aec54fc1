"""Who may join and publish where, once the backend and subscription tokens have a say.

:class:`~wsserver.rooms.RoomPolicy` answers from the policy and the
connection's token alone, synchronously. :class:`RoomAccess` adds the two
ways in that need to wait:

* a **subscription token** in the join (``{"type": "join", "room": R,
  "token": JWT}``): a JWT verified with the server's keys whose ``sub`` is
  the connection's user and whose ``room`` claim is R joins R whatever the
  namespace's ``join`` rule (``none`` excepted); with ``"publish": true`` it
  grants publishing to R too (``none`` excepted; in a ``proxy`` namespace
  the backend still sees every publish, so it can moderate);
* the **backend**, for namespaces with ``join = "proxy"`` or
  ``publish = "proxy"``: asked per join and per publish
  (:class:`~wsserver.backend.Backend`), and a publish's data may be replaced.

How a member got in is remembered for as long as it stays in the room: a
``refresh`` then re-checks only rooms the connection's own token granted, and
a subscription token's ``publish`` keeps applying. Proxied publishes of one
connection reach the broker in the order they were sent, however the
backend's answers are ordered.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any, Protocol

from wsserver.auth import Identity, TokenVerifier
from wsserver.backend import Backend
from wsserver.errors import Forbidden, TokenInvalid
from wsserver.metrics import Metrics
from wsserver.rooms import RoomPolicy


class Member(Protocol):
    """What :class:`RoomAccess` needs of a connection (a Session)."""

    @property
    def identity(self) -> Identity | None: ...


class RoomAccess:
    """The join and publish checks: policy, token grants, subscription tokens, backend."""

    def __init__(
        self,
        policy: RoomPolicy,
        verifier: TokenVerifier,
        metrics: Metrics,
        backend: Backend | None = None,
    ) -> None:
        self.policy = policy
        self.verifier = verifier
        self.metrics = metrics
        self.backend = backend
        #: Per connection, the rooms it got into by a subscription token or the
        #: backend, and whether it may publish there by the token's say.
        self._side_grants: weakref.WeakKeyDictionary[Member, dict[str, bool]] = (
            weakref.WeakKeyDictionary()
        )
        #: Per connection, the last proxied publish still waiting for its turn.
        self._publishing: weakref.WeakKeyDictionary[Member, asyncio.Future[None]] = (
            weakref.WeakKeyDictionary()
        )

    async def check_join(
        self, member: Member, room: str, token: str | None = None, data: Any = None
    ) -> None:
        """Allow ``member`` into ``room`` (a valid room name) or raise.

        Args:
            token: the join's subscription token, if any.
            data: the join's ``data``, passed to the subscribe proxy.

        Raises:
            Forbidden: nothing grants it (a clear message; the connection stays).
            BackendError: the subscribe proxy refused, with its own code.
            Unavailable: the subscribe proxy did not answer in time.
        """
        identity = member.identity
        assert identity is not None
        rule = self.policy.policy_for(room).join
        if token is not None:
            if rule == "none":
                raise self._forbidden(f"nobody joins {room!r} (only the server publishes there)")
            try:
                publish = await self.verifier.verify_subscription(token, identity.user, room)
            except TokenInvalid as exc:
                raise self._forbidden(f"subscription token refused: {exc.reason}") from None
            self._side_grants.setdefault(member, {})[room] = publish
            return
        if rule == "proxy":
            assert self.backend is not None, "check-config requires --proxy-subscribe-url"
            await self.backend.subscribe(identity.user, room, data)
            self._side_grants.setdefault(member, {})[room] = False
            return
        if not self.policy.can_join(identity.user, identity.grants, room):
            raise self._forbidden(f"not allowed to join {room!r}")
        self.forget_room(member, room)

    async def check_publish(self, member: Member, room: str, data: Any) -> Any:
        """Allow ``member`` (a member of ``room``) to publish ``data``; the data to publish.

        Raises:
            Forbidden, BackendError, Unavailable: as :meth:`check_join`.
        """
        identity = member.identity
        assert identity is not None
        rule = self.policy.policy_for(room).publish
        if rule == "proxy":
            assert self.backend is not None, "check-config requires --proxy-publish-url"
            return await self._in_order(member, self.backend.publish(identity.user, room, data))
        if rule != "none" and self._side_grants.get(member, {}).get(room):
            return data  # the subscription token said "publish": true
        if not self.policy.can_publish(identity.user, identity.grants, room, True):
            raise self._forbidden(f"not allowed to publish to {room!r}")
        return data

    def may_stay(self, member: Member, room: str) -> bool:
        """After a refresh: True while ``member`` may stay in ``room``.

        Rooms entered by a subscription token or the backend stay; the others
        follow the new token's grants.
        """
        if room in self._side_grants.get(member, {}):
            return True
        identity = member.identity
        return identity is not None and self.policy.can_join(identity.user, identity.grants, room)

    def forget_room(self, member: Member, room: str) -> None:
        """``member`` left ``room``: a later join is checked afresh."""
        grants = self._side_grants.get(member)
        if grants is not None:
            grants.pop(room, None)

    def _forbidden(self, message: str) -> Forbidden:
        self.metrics.rejections.labels("forbidden").inc()
        return Forbidden(message)

    async def _in_order(self, member: Member, decision: Any) -> Any:
        """Await ``decision`` (a proxied publish), then return no earlier than the
        connection's previous proxied publish did.

        The calls run concurrently; only their results are released in the
        order the publishes arrived, so each reaches the broker in that order.
        """
        previous = self._publishing.get(member)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._publishing[member] = turn
        try:
            result = await decision
        finally:
            if previous is not None and not previous.done():
                with contextlib.suppress(BaseException):
                    await asyncio.shield(previous)
            turn.set_result(None)
        return result
