"""The broker: how publications, presence and cluster state travel between nodes.

Every publish goes through a :class:`Broker`, even in one process: the
:class:`~wsserver.hub.Hub` never delivers a client's publish directly. The
broker assigns the room's next offset (when the room keeps history), stores
the message, and calls :meth:`BrokerSink.on_publication` on every node that
subscribed to the room, where the hub builds the frame once for its local
members. ``MemoryBroker`` (one process) and ``RedisBroker`` (many processes
and machines) are siblings behind this interface and pass the same contract
tests (``tests/brokers/``).

Messages travel as bytes: the complete JSON text of the ``message`` object a
client receives, minus ``offset``/``epoch``, which the broker appends when it
assigns them (see :func:`with_position`). A node therefore never re-encodes a
publication it receives.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from wsserver.errors import WsServerError


class BrokerUnavailable(WsServerError):
    """The broker cannot be reached right now (clients: ``unavailable``; API: 503)."""

    def __init__(self, message: str = "broker unavailable", retry_after: float = 2.0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class HistorySpec:
    """A room's history policy, from its namespace: ``size`` messages for ``ttl`` s."""

    size: int
    ttl: float


@dataclass(frozen=True, slots=True)
class Publication:
    """One message in a room, as every node receives it.

    ``payload`` is the complete JSON object a member receives (with ``offset``
    and ``epoch`` when the room keeps history). ``origin`` is the opaque tag
    the publisher passed (None for the server API); the publishing node uses it
    to send its own client the copy that carries the client's ``id``.
    """

    room: str
    payload: bytes
    offset: int | None = None
    epoch: str | None = None
    origin: str | None = None


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What a publish answers: the position it got, when the room keeps history.

    ``duplicate`` is True when an idempotency key was seen before: nothing was
    published, and the position is the first publish's.
    """

    offset: int | None = None
    epoch: str | None = None
    duplicate: bool = False

    def as_dict(self) -> dict[str, object]:
        return {} if self.offset is None else {"offset": self.offset, "epoch": self.epoch}


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A room's stream position and the kept publications after an offset.

    ``complete`` is True when every message after the requested offset up to
    ``offset`` (the top) is in ``publications`` (none was trimmed or expired),
    i.e. a recovery from that offset would lose nothing.
    """

    epoch: str
    offset: int
    publications: Sequence[Publication] = ()
    complete: bool = True


@dataclass(frozen=True, slots=True)
class Presence:
    """Who is in a room on every node."""

    users: list[str]
    connections: int


@dataclass(frozen=True, slots=True)
class RoomCount:
    connections: int
    users: int


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node sharing the broker, as ``/api/nodes`` shows it."""

    name: str
    connections: int
    users: int
    uptime: float


@dataclass(frozen=True, slots=True)
class NodeStats:
    """What this node reports about itself in its heartbeat."""

    connections: int
    users: int
    uptime: float
    extra: dict[str, object] = field(default_factory=dict)


class BrokerSink(Protocol):
    """What a broker calls back on this node (the hub implements it)."""

    def on_publication(self, publication: Publication) -> None:
        """A publication in a room this node subscribed to, in offset order per room."""
        ...

    def on_disconnect(self, user: str, code: int, reason: str) -> None:
        """Close every local connection of ``user`` (``/api/disconnect`` on any node)."""
        ...

    def on_presence_lost(self, room: str, user: str) -> None:
        """``user`` left ``room`` because its node died (for ``user_left`` events)."""
        ...

    def on_resubscribed(self, rooms: Sequence[str]) -> None:
        """The subscription was interrupted and is back: repair gaps in ``rooms``."""
        ...

    def node_stats(self) -> NodeStats:
        """This node's counts, for heartbeats and ``/api/nodes``."""
        ...


#: Takes a client message forwarded to this node: ``handler(session, text)``.
ForwardedHandler = Callable[[str, str], None]


class Broker(abc.ABC):
    """Publications, history, presence and cluster-wide counts.

    Every coroutine raises :class:`BrokerUnavailable` when the broker cannot
    be reached; the callers turn that into ``unavailable`` / 503.
    """

    #: ``memory`` or ``redis``: the ``--broker`` scheme, for logs and metrics.
    kind: str = "abstract"

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        #: This process's tag in the ids of its HTTP streams (random, 8 URL-safe
        #: characters): a ``POST /sse/send`` that reaches another node (another
        #: ``--workers`` process) is forwarded to the node whose tag the id carries.
        self.node_tag = secrets.token_urlsafe(6)
        self._forwarded: ForwardedHandler | None = None

    @property
    @abc.abstractmethod
    def up(self) -> bool:
        """False while the broker is known to be unreachable (``/readyz`` 503)."""

    @abc.abstractmethod
    async def start(self, sink: BrokerSink) -> None:
        """Connect, register this node, start heartbeats and the readiness probe."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Unregister this node and drop every connection; idempotent."""

    # --- publications ---------------------------------------------------------

    @abc.abstractmethod
    async def publish(
        self,
        room: str,
        message: bytes,
        *,
        history: HistorySpec | None = None,
        origin: str | None = None,
        idempotency_key: str | None = None,
    ) -> PublishResult:
        """Deliver ``message`` to every node subscribed to ``room``, in one round trip.

        Args:
            message: a JSON object's text ending in ``}``; when ``history`` is
                given the broker appends ``"offset"`` and ``"epoch"`` to it
                (:func:`with_position`), assigns the offset atomically with
                storing it, and trims the room to ``history.size``.
            origin: passed through to :attr:`Publication.origin`.
            idempotency_key: the same key for the same room within
                :data:`IDEMPOTENCY_TTL` seconds publishes once; later calls
                answer the first call's result, marked ``duplicate``.
        """

    @abc.abstractmethod
    async def subscribe(self, room: str) -> None:
        """Receive ``room``'s publications on this node (first local member joined)."""

    @abc.abstractmethod
    async def unsubscribe(self, room: str) -> None:
        """Stop receiving ``room`` (its last local member left)."""

    @abc.abstractmethod
    async def history(
        self, room: str, history: HistorySpec, *, since: int | None = None,
        limit: int | None = None,
    ) -> HistoryPage:
        """The room's epoch, top offset and the kept publications after ``since``.

        With ``since`` None only the position is answered (no publications).
        ``limit`` caps how many publications come back, oldest first; a page cut
        by ``limit`` is not ``complete``.
        """

    @abc.abstractmethod
    async def reset_epoch(self, room: str, history: HistorySpec, stale: str) -> str:
        """Give ``room`` a new epoch (and an empty history) if it is still in ``stale``.

        For a broker that went back in time: a node that delivered offsets past
        the room's top (Redis lost its last writes: a failover to a replica that
        had not got them, an AOF that lost its last second) would otherwise see
        those offsets given out again to other messages. Returns the epoch the
        room has afterwards (a new one, or whatever another node set first).
        """

    # --- presence -------------------------------------------------------------

    @abc.abstractmethod
    async def presence_add(self, room: str, user: str) -> bool:
        """Count one more connection of ``user`` in ``room``; True when it is the
        user's first connection there on any node."""

    @abc.abstractmethod
    async def presence_remove(self, room: str, user: str) -> bool:
        """Count one connection fewer; True when it was the user's last one anywhere."""

    @abc.abstractmethod
    async def presence(self, room: str) -> Presence:
        """Who is in ``room`` on every node."""

    @abc.abstractmethod
    async def rooms(self) -> dict[str, RoomCount]:
        """Every room with members on any node."""

    # --- users and nodes ------------------------------------------------------

    @abc.abstractmethod
    async def user_connect(self, user: str, limit: int) -> int | None:
        """Count a new connection of ``user`` on this node if the user has fewer
        than ``limit`` on all nodes together; the user's count after it, or None
        when the user is at the limit (nothing counted).

        Raises :class:`BrokerUnavailable` when the broker cannot be reached;
        the caller then admits the connection on this node's count alone, and
        the broker still counts it (in the cluster once it is back), so the
        caller calls :meth:`user_disconnect` for it as for any other."""

    @abc.abstractmethod
    async def user_disconnect(self, user: str) -> None:
        """Forget one connection of ``user`` on this node."""

    @abc.abstractmethod
    async def user_connections(self, users: Sequence[str]) -> dict[str, int]:
        """Each user's connections on all nodes (for shared message buckets)."""

    @abc.abstractmethod
    async def disconnect_user(self, user: str, code: int, reason: str) -> None:
        """Ask every node (this one included) to close ``user``'s connections."""

    @abc.abstractmethod
    async def nodes(self) -> list[NodeInfo]:
        """The live nodes sharing this broker, this one included."""

    # --- HTTP streaming: tickets and forwarded client messages ----------------

    @abc.abstractmethod
    async def ticket_put(self, ticket: str, token: str, ttl: float) -> None:
        """Keep ``token`` under ``ticket`` for ``ttl`` seconds, for one
        :meth:`ticket_take` on any node (``POST /auth/ticket``)."""

    @abc.abstractmethod
    async def ticket_take(self, ticket: str) -> str | None:
        """The token kept under ``ticket``, removed in the same step (single
        use); None when there is none (never issued, taken, expired)."""

    @abc.abstractmethod
    async def forward(self, node_tag: str, session: str, text: str) -> bool:
        """Hand one client message for stream ``session`` to the node tagged
        ``node_tag`` (its handler from :meth:`serve_forwarded`), in the order of
        the calls; False when no node with that tag is listening."""

    def serve_forwarded(self, handler: ForwardedHandler) -> None:
        """Who takes the messages :meth:`forward` sends to this node."""
        self._forwarded = handler


#: Seconds an idempotency key is remembered.
IDEMPOTENCY_TTL = 300.0


def with_position(message: bytes, offset: int, epoch: str) -> bytes:
    """``message`` (a JSON object's text) with ``offset`` and ``epoch`` appended.

    ``epoch`` is generated by the broker (URL-safe characters only), so it needs
    no JSON escaping.
    """
    return b'%s,"offset":%d,"epoch":"%s"}' % (message[:-1], offset, epoch.encode("ascii"))
