"""Every Redis key and channel name of the Redis broker, from its prefix and node name.

The layout is documented with the scripts that use it
(:mod:`wsserver.brokers.redis_scripts`); this is the one place that spells
the names. Pure: no redis-py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeySpace:
    """The names of one node's keys and channels under ``prefix``."""

    prefix: str
    node: str

    # --- channels --------------------------------------------------------------

    @property
    def control(self) -> bytes:
        """Disconnects and presence lost with a dead node, for every node."""
        return f"{self.prefix}:control".encode()

    @property
    def probe(self) -> bytes:
        """This node's readiness probe (published and read back by this node)."""
        return f"{self.prefix}:probe:{self.node}".encode()

    def room_channel(self, room: str) -> bytes:
        """The channel of ``room``'s publications."""
        return f"{self.prefix}:room:{room}".encode()

    def forward(self, node_tag: str) -> bytes:
        """The channel of the client messages forwarded to the process tagged ``node_tag``
        (its HTTP streams' messages that reached another node)."""
        return f"{self.prefix}:fwd:{node_tag}".encode()

    # --- publications and history ----------------------------------------------

    def stream(self, room: str) -> list[str]:
        """KEYS of HISTORY and RESET_EPOCH: the room's meta hash and its stream."""
        return [f"{self.prefix}:meta:{room}", f"{self.prefix}:stream:{room}"]

    def publish(self, room: str, idempotency_key: str | None) -> list[str]:
        """KEYS of PUBLISH: meta, stream, idempotency key ("" for none)."""
        idem = "" if idempotency_key is None else (
            f"{self.prefix}:idem:{len(room)}:{room}:{idempotency_key}"
        )
        return [*self.stream(room), idem]

    def ticket(self, ticket: str) -> str:
        """Where a single-use stream ticket keeps its token."""
        return f"{self.prefix}:ticket:{ticket}"

    # --- presence, users, nodes ------------------------------------------------

    def presence(self, room: str) -> list[str]:
        """KEYS of PRESENCE_ADD and PRESENCE_REMOVE for this node."""
        p = self.prefix
        return [f"{p}:pr:{room}", f"{p}:pu:{room}", f"{p}:rooms", f"{p}:nr:{self.node}"]

    def room_users(self, room: str) -> str:
        """The hash of ``room``'s users and their connections on every node."""
        return f"{self.prefix}:pu:{room}"

    @property
    def rooms(self) -> str:
        """The hash of every room's connections on every node."""
        return f"{self.prefix}:rooms"

    @property
    def users(self) -> list[str]:
        """KEYS of USER_CONNECT and USER_DISCONNECT: all nodes' counts and this node's."""
        return [self.user_totals, f"{self.prefix}:un:{self.node}"]

    @property
    def user_totals(self) -> str:
        """The hash of each user's connections on every node."""
        return f"{self.prefix}:ut"

    @property
    def nodes(self) -> str:
        """The sorted set of live nodes, scored by their heartbeat's deadline."""
        return f"{self.prefix}:nodes"

    @property
    def heartbeat(self) -> list[str]:
        """KEYS of HEARTBEAT: the node set and this node's stats."""
        return [self.nodes, f"{self.prefix}:node:{self.node}"]
