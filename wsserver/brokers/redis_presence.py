"""The Redis broker's presence side: who is where, user counts and the node registry.

Presence and per-user connection counts live in Redis, per node (a dead node's
entries can then be removed). Each node also keeps its own account of its
entries, to put them back when Redis lost them (a restart without
persistence) or an outage left a command in doubt: a *resync* replaces the
node's entries with its account while new presence and user commands wait.

Heartbeats register the node (``/api/nodes``) and reap the nodes whose
heartbeats stopped, removing their entries (the HEARTBEAT script).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from wsserver.brokers.base import BrokerUnavailable, NodeInfo, NodeStats, Presence, RoomCount
from wsserver.brokers.redis_codec import heartbeat_body, ms, node_infos, room_counts
from wsserver.brokers.redis_commands import RedisCommands
from wsserver.brokers.redis_keys import KeySpace

log = logging.getLogger("wsserver.broker")

T = TypeVar("T")


class RedisPresence:
    """Presence, user counts and this node's registration, kept true in Redis.

    Args:
        keys: the node's key names.
        commands: how commands reach Redis.
        node_stats: this node's counts, for heartbeats and :meth:`nodes`
            (None until the broker has a sink).
        heartbeat_interval, node_ttl: as the broker's.
    """

    def __init__(
        self, keys: KeySpace, commands: RedisCommands, *,
        node_stats: Callable[[], NodeStats | None], heartbeat_interval: float,
        node_ttl: float,
    ) -> None:
        self._keys = keys
        self._node = keys.node
        self._commands = commands
        self._node_stats = node_stats
        self.heartbeat_interval = heartbeat_interval
        self.node_ttl = node_ttl
        self.closing = False
        self.registered = False
        # This node's own account of its presence and user entries, to put
        # them back when Redis lost them (restart without persistence) or an
        # outage left a command in doubt. _gate holds new presence and user
        # commands while a resync replaces the node's entries.
        self._my_presence: Counter[tuple[str, str]] = Counter()
        self._my_users: Counter[str] = Counter()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._gate: asyncio.Event | None = None
        self._dirty = False

    # --- presence -------------------------------------------------------------

    async def presence_add(self, room: str, user: str) -> bool:
        """Count one more connection of ``user`` in ``room``; True when it is the first."""
        async with self._counted():
            count = await self._commands.script(
                "PRESENCE_ADD", self._keys.presence(room), [self._node, user, room]
            )
            self._my_presence[(room, user)] += 1
        return int(count) == 1

    async def presence_remove(self, room: str, user: str) -> bool:
        """Count one connection fewer; True when it was the user's last one anywhere."""
        async with self._counted():
            # Gone whether or not Redis hears of it now: a resync tells it later.
            _decrement(self._my_presence, (room, user))
            last = await self._commands.script(
                "PRESENCE_REMOVE", self._keys.presence(room), [self._node, user, room]
            )
        return int(last) == 1

    async def presence(self, room: str) -> Presence:
        """Who is in ``room`` on every node."""
        key = self._keys.room_users(room)
        counts: dict[bytes, bytes] = await self._commands.command("HGETALL", key)
        users = sorted(user.decode() for user in counts)
        return Presence(users, sum(int(n) for n in counts.values()))

    async def rooms(self) -> dict[str, RoomCount]:
        """Every room with members on any node."""
        flat = await self._commands.script("ROOMS", [self._keys.rooms], [self._keys.prefix])
        return room_counts(flat)

    # --- users ------------------------------------------------------------------

    async def user_connect(self, user: str, limit: int) -> int | None:
        """Count a connection of ``user`` if under ``limit`` on all nodes (Broker's contract)."""
        async with self._counted():
            try:
                count = int(await self._commands.script(
                    "USER_CONNECT", self._keys.users, [user, limit]
                ))
            except BrokerUnavailable:
                # The caller admits it on this node's count: in this node's
                # account it goes, and the resync once Redis is back (_counted
                # marks the node dirty) counts it on every node.
                self._my_users[user] += 1
                raise
            if count >= 0:
                self._my_users[user] += 1
        return None if count < 0 else count

    async def user_disconnect(self, user: str) -> None:
        """Forget one connection of ``user`` on this node."""
        async with self._counted():
            _decrement(self._my_users, user)
            await self._commands.script("USER_DISCONNECT", self._keys.users, [user])

    async def user_connections(self, users: Sequence[str]) -> dict[str, int]:
        """Each user's connections on all nodes."""
        if not users:
            return {}
        key = self._keys.user_totals
        names = list(users)
        counts: list[bytes | None] = await self._commands.command("HMGET", key, *names)
        return {user: int(n or 0) for user, n in zip(names, counts, strict=True)}

    # --- nodes ------------------------------------------------------------------

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes, this one with its counts as of now."""
        flat = await self._commands.script("NODES", [self._keys.nodes], [self._keys.prefix])
        found = node_infos(flat)
        mine = self._node_stats()
        if mine is not None:
            found[self._node] = NodeInfo(self._node, mine.connections, mine.users, mine.uptime)
        return [found[name] for name in sorted(found)]

    async def heartbeats(self) -> None:
        """A heartbeat every ``heartbeat_interval``."""
        while not self.closing:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.heartbeat()
            except BrokerUnavailable:
                pass  # the probe reports Redis down; heartbeats resume with it
            except Exception:
                log.exception("broker: heartbeat failed")

    async def heartbeat(self) -> list[str]:
        """Register this node now and reap overdue nodes; the names reaped."""
        if not self.registered:
            await self.resync(fresh=True)
        elif self._dirty:
            await self.resync_quietly("after failed commands")
        stats = self._node_stats() or NodeStats(0, 0, 0.0)
        answer = await self._commands.script(
            "HEARTBEAT", self._keys.heartbeat,
            [self._keys.prefix, self._node, heartbeat_body(stats), ms(self.node_ttl),
             ms(self.heartbeat_interval)],
            gated=False,
        )
        if self.registered and not int(answer[0]):
            log.warning(
                "broker: Redis did not know this node (%s): it lost its data, or this node "
                "missed heartbeats for %.0f s and was taken for dead; restoring its entries",
                self._node, self.node_ttl,
            )
            await self.resync_quietly("Redis had lost them")
        self.registered = True
        reaped = [name.decode() for name in answer[1:]]
        for name in reaped:
            log.warning("broker: node %s stopped sending heartbeats; removed its users", name)
        return reaped

    async def leave(self) -> None:
        """Unregister this node if it registered, so others need not wait node_ttl to see it
        go; nothing if Redis cannot be reached (it is shutting down)."""
        if not self.registered:
            return
        with contextlib.suppress(BrokerUnavailable):
            await self._commands.script(
                "LEAVE", [], [self._keys.prefix, self._node], gated=False
            )

    # --- this node's entries --------------------------------------------------

    @contextlib.asynccontextmanager
    async def _counted(self) -> AsyncIterator[None]:
        """Run a presence or user command, never during a resync."""
        while self._gate is not None:
            await self._gate.wait()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        except BrokerUnavailable:
            # It may have run, or not, or (a remove) must still be told:
            # the next heartbeat replaces this node's entries.
            self._dirty = True
            raise
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def resync(self, *, fresh: bool = False) -> None:
        """Replace this node's presence and user entries in Redis with its own account.

        Done after Redis lost them (its heartbeat was unknown) and after an
        outage (a command that timed out may or may not have run). Presence
        and user commands wait meanwhile, so the account is exact. ``fresh``
        (this process's first registration) first removes what a previous
        process of the same node name left, telling every node its users left.
        """
        if self._gate is not None:
            return
        gate = self._gate = asyncio.Event()
        try:
            await self._idle.wait()
            prefix = self._keys.prefix
            if fresh:
                await self._commands.script("LEAVE", [], [prefix, self._node], gated=False)
            args: list[Any] = [prefix, self._node, len(self._my_presence)]
            for (room, user), count in self._my_presence.items():
                args += [room, user, count]
            for user, count in self._my_users.items():
                args += [user, count]
            await self._commands.script("RESYNC", [], args, gated=False)
            self._dirty = False
        finally:
            self._gate = None
            gate.set()

    async def resync_quietly(self, why: str) -> None:
        """:meth:`resync`, logged; if Redis is unreachable the next heartbeat tries again."""
        try:
            await self.resync()
        except BrokerUnavailable:
            return  # the next heartbeat finds the node unknown and tries again
        log.info(
            "broker: restored %d presence and %d user entries of this node (%s)",
            sum(self._my_presence.values()), sum(self._my_users.values()), why,
        )


def _decrement(counts: Counter[T], key: T) -> None:
    if counts[key] > 1:
        counts[key] -= 1
    else:
        counts.pop(key, None)
