"""Session: one connection's logic, after the 101, with no I/O of its own.

A Session takes text messages and a clock, and talks to a
:class:`~wsserver.transport.Transport`: it verifies the token, enforces the
caps and the message budget, dispatches each message type, keeps the token's
expiry and the keepalive, and forgets itself everywhere when the connection
goes. Rooms go through the :class:`~wsserver.hub.Hub`, tasks through the
:class:`~wsserver.pool.TaskPool`. The Tornado handler and the fast frame path
only do the handshake and hand messages in; the unit tests drive a Session with
a recording transport and a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from wsserver import protocol
from wsserver.auth import Credentials, Identity
from wsserver.brokers.base import BrokerUnavailable
from wsserver.closecodes import metric_label
from wsserver.errors import (
    Busy,
    CloseError,
    Forbidden,
    GoingAway,
    InternalError,
    KeepaliveTimeout,
    MessageError,
    PolicyViolation,
    RateLimited,
    RateLimitExceeded,
    SlowConsumer,
    TaskFailed,
    TokenExpired,
    TokenInvalid,
    TooManyForUser,
    Unavailable,
    UnknownType,
)
from wsserver.logsafe import escape
from wsserver.protocol import ClientMessage, MessageId
from wsserver.tasks import Task
from wsserver.transport import Prepared, TimerHandle, Transport

if TYPE_CHECKING:
    from wsserver.services import Services

log = logging.getLogger("wsserver.connection")

#: Client messages queued behind one that waits on the broker (a join, a
#: publish). Past it the connection is not read until the queue is half
#: empty: TCP slows a fast sender down (back-pressure, never a close).
MAX_QUEUED = 64
#: Publishes of one connection handed to the broker and not yet answered.
MAX_PUBLISHING = 32
#: Seconds between looks at a lagging connection's backlog (see drained()).
DRAIN_POLL = 0.05

Handler = Callable[["Session", ClientMessage], None]
AsyncHandler = Callable[["Session", ClientMessage], Coroutine[Any, Any, None]]


class Session:
    """One connection: authenticated in :meth:`open`, then fed by the transport.

    Implements :class:`~wsserver.transport.Receiver`.
    """

    _serials = 0

    def __init__(
        self,
        services: Services,
        transport: Transport,
        address: str,
        limit_key: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        Session._serials += 1
        self.serial = Session._serials
        self.services = services
        self.transport = transport
        self.address = address
        self.limit_key = limit_key
        self._clock = clock
        self._wall = wall
        self.identity: Identity | None = None
        self._log_user = "-"
        self.opened_at = clock()
        self.ended_with: CloseError | None = None
        self.closed = False
        self._counted_in_broker = False
        #: True once counted in the wsserver_connections gauge (after the welcome).
        self._in_gauge = False
        self._timer: TimerHandle | None = None
        self._next_ping = 0.0
        self._pong_due: float | None = None
        settings = services.settings
        self._strikes = 0
        # Strikes are forgiven only after a full refill's time without a
        # refusal: a token trickling back between refusals must not wipe them.
        self._strike_memory = settings.message_burst / settings.message_rate
        self._last_refused = -math.inf
        self._max_write_buffer = settings.max_write_buffer
        #: Room traffic stops at --max-write-buffer; replies may use as much again.
        self._max_reply_buffer = 2 * settings.max_write_buffer
        self.tasks_in_flight = 0
        #: Messages that arrived while one of this session's broker calls ran.
        self._queue: deque[str] | None = None
        #: True while the transport holds messages back (the queue was full).
        self._paused = False
        #: Resolved once the backlog is back under a quarter of the write bound.
        self._drained: asyncio.Future[None] | None = None
        #: (since when, bytes) the backlog has not shrunk: the slow-consumer clock.
        self._stalled: tuple[float, int] | None = None

    # --- start ---------------------------------------------------------------

    @property
    def user(self) -> str:
        """The verified ``sub`` for log lines; "-" before a token was verified (a
        4008 refusal's close line still names its user)."""
        return self._log_user

    async def open(
        self, credentials: Credentials, verdict: Identity | CloseError | None = None,
        *, welcome: Mapping[str, Any] | None = None,
    ) -> bool:
        """Verify the token (unless ``verdict`` is its verification, done before
        the upgrade) and the caps, then welcome the client (``welcome``: fields
        the transport adds to the welcome, e.g. an HTTP stream's ``session``).

        Returns False when the connection was refused (4001 / 4008); nothing
        the client sent is processed before this returns. A refused connection
        counts in the registry's unverified pool until its socket is gone.
        """
        services = self.services
        registry = services.registry
        if verdict is None:
            try:
                verdict = services.verifier.verify(credentials.token)
            except CloseError as error:
                verdict = error
        registry.admit(self, self.limit_key, verified=not isinstance(verdict, CloseError))
        if isinstance(verdict, CloseError):
            registry.demote(self)
            self.end(verdict)
            return False
        identity = verdict
        self.identity = identity
        self._log_user = identity.user
        try:
            registry.authenticate(self, identity.user)
            await self._count_in_broker(identity.user)
        except CloseError as error:
            # Not this user's connection after all: uncount it, keep it unverified.
            registry.remove(self)
            registry.admit(self, self.limit_key, verified=False)
            self.identity = None
            self.end(error)
            return False
        if self.ended_with is not None or self.closed:
            return False  # the client went while the broker answered
        self._in_gauge = True
        services.metrics.connection_opened(self.transport.kind)
        log.info("open user=%s addr=%s via=%s", escape(identity.user), escape(self.address),
                 credentials.source)
        settings = services.settings
        self.send(
            {
                "type": "welcome",
                "user": identity.user,
                # null: the connect proxy's session has no end.
                "expires_at": _unix(identity.expires_at),
                "limits": {
                    "message_rate": settings.message_rate,
                    "message_burst": settings.message_burst,
                    "max_message_size": settings.max_message_size,
                    "tasks_in_flight": settings.task_per_connection,
                    "tasks_per_user": settings.task_per_user,
                    "connections_per_user": settings.max_connections_per_user,
                },
                **(welcome or {}),
            }
        )
        self._next_ping = self._clock() + settings.ping_interval
        self._schedule_expiry()
        return True

    async def _count_in_broker(self, user: str) -> None:
        """The per-user cap on every node; with the broker down, this node's count."""
        broker = self.services.broker
        try:
            count = await broker.user_connect(user, self.services.settings.max_connections_per_user)
        except BrokerUnavailable:
            log.warning("broker unavailable: user=%s counted on this node only", user)
            # The broker still counts it once it is back: count it down at close.
            self._counted_in_broker = True
            return
        if count is None:
            raise TooManyForUser()
        self._counted_in_broker = True
        self.services.share_bucket(user, count)

    # --- messages (Receiver) ---------------------------------------------------

    def on_text(self, text: str) -> None:
        """One text message from the client."""
        if self.identity is None or self.ended_with is not None:
            # Not authenticated, or already closing: frames pipelined behind
            # the handshake of a rejected token are dropped unread.
            return
        queue = self._queue
        if queue is not None:
            queue.append(text)
            if len(queue) >= MAX_QUEUED and not self._paused:
                # Not a close: stop reading until the queue has drained.
                self._paused = True
                self.transport.pause_reading()
            return
        self._handle(text)

    def on_binary(self, data: bytes) -> None:
        if self.identity is not None:
            self.end(PolicyViolation("binary frames are not accepted"))

    def on_pong(self, data: bytes) -> None:
        self._pong_due = None

    def _handle(self, text: str) -> None:
        msg = self._accept(text)
        if msg is None:
            return
        if msg.type in self._SYNC:
            self._serve_sync(msg)
        else:
            self._queue = deque()
            self.services.spawn(self._serve_async(msg))

    def _accept(self, text: str) -> ClientMessage | None:
        """The message, past the user's bucket and the parser; None once answered."""
        identity = self.identity
        assert identity is not None
        services = self.services
        wait = services.message_buckets.take(identity.user)
        if wait:
            self._on_rate_limited(text, wait)
            return None
        if self._strikes and self._clock() - self._last_refused >= self._strike_memory:
            self._strikes = 0
        try:
            msg = protocol.parse(text)
        except MessageError as error:
            services.metrics.messages.labels("invalid").inc()
            self.reply_error(error, protocol.salvage_id(text))
            return None
        services.metrics.messages.labels(msg.type).inc()
        return msg

    def _serve_sync(self, msg: ClientMessage) -> None:
        """Serve a message that needs no broker (ping, echo, task, ...)."""
        try:
            self._SYNC[msg.type](self, msg)
        except MessageError as error:
            self.reply_error(error, msg.id)
        except CloseError as error:
            self.end(error)
        except Exception:
            log.exception("error serving %s for user=%s", msg.type, escape(self.user))
            self.reply_error(InternalError("internal error; the connection stays open"), msg.id)

    async def _serve_async(self, msg: ClientMessage) -> None:
        """Serve a message that waits on the broker, then those queued behind it.

        While one waits, later messages queue (so a publish right after a
        join sees the join done) and are served in order by this task. A run
        of publishes is the exception: each is handed to the broker without
        waiting for the one before to be answered (the broker keeps the order
        they were handed over in), so they share the broker's round trips
        (the Redis broker pipelines them) and the messages they fan out to a
        member leave in one write. Any other message waits for the whole run,
        so replies keep their order; only a message refused before it was
        parsed (rate limited, malformed) is answered at once.
        """
        publishing: list[asyncio.Future[None]] = []
        next_msg: ClientMessage | None = msg
        try:
            while next_msg is not None:
                if next_msg.type == "publish":
                    publishing.append(asyncio.ensure_future(self._serve_one(next_msg)))
                    if len(publishing) >= MAX_PUBLISHING:
                        await publishing.pop(0)
                else:
                    await _all(publishing)
                    if self.ended_with is not None:
                        return
                    if next_msg.type in self._SYNC:
                        self._serve_sync(next_msg)
                    else:
                        await self._serve_one(next_msg)
                next_msg = self._next_queued()
                if next_msg is None:
                    await _all(publishing)
                    next_msg = self._next_queued()
        finally:
            self._queue = None
            for future in publishing:
                future.cancel()
            self._resume()

    def _next_queued(self) -> ClientMessage | None:
        """The next queued message past the bucket and the parser, if any."""
        queue = self._queue
        while queue and self.ended_with is None:
            msg = self._accept(queue.popleft())
            if self._paused and len(queue) <= MAX_QUEUED // 2:
                self._resume()  # may queue more, read from behind the pause
            if msg is not None:
                return msg
        return None

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resume_reading()

    async def _serve_one(self, msg: ClientMessage) -> None:
        try:
            await self._ASYNC[msg.type](self, msg)
        except MessageError as error:
            self.reply_error(error, msg.id)
        except BrokerUnavailable as error:
            self.reply_error(Unavailable(retry_after=error.retry_after), msg.id)
        except CloseError as error:
            self.end(error)
        except Exception:
            log.exception("error serving %s for user=%s", msg.type, escape(self.user))
            self.reply_error(InternalError("internal error; the connection stays open"), msg.id)

    def _on_rate_limited(self, text: str, wait: float) -> None:
        self._strikes += 1
        self._last_refused = self._clock()
        self.services.metrics.rejections.labels("rate_limited").inc()
        if self._strikes > self.services.settings.rate_limit_strikes:
            self.end(RateLimitExceeded())
            return
        self.reply_error(RateLimited(wait), protocol.salvage_id(text))

    def _on_ping(self, msg: ClientMessage) -> None:
        self.reply(msg, {"type": "pong"})

    def _on_echo(self, msg: ClientMessage) -> None:
        self.reply(msg, {"type": "echo", "data": msg.field("data")})

    async def _on_join(self, msg: ClientMessage) -> None:
        assert self.identity is not None
        def answer(reply: dict[str, Any]) -> None:
            if msg.id is not None:
                reply["id"] = msg.id
            self.send_prepared(Prepared(protocol.encode_with_raw(reply)))

        await self.services.hub.join(self, msg.field("room"), msg.body.get("since"), answer,
                                     msg.body.get("token"), msg.body.get("data"))

    async def _on_leave(self, msg: ClientMessage) -> None:
        room = msg.field("room")
        await self.services.hub.leave(self, room)
        self.reply(msg, {"type": "left", "room": room})

    async def _on_publish(self, msg: ClientMessage) -> None:
        room = msg.field("room")
        result = await self.services.hub.publish_from(
            self, room, msg.field("data"), msg.id, msg.body.get("idempotency_key"))
        if result.duplicate:
            # Published before: no copy comes; this is the answer instead.
            self.reply(msg, {"type": "published", "room": room, "duplicate": True,
                             **result.as_dict()})

    async def _on_presence(self, msg: ClientMessage) -> None:
        room = msg.field("room")
        presence = await self.services.hub.presence_for(self, room)
        self.reply(msg, {"type": "presence", "room": room, "users": presence.users,
                         "connections": presence.connections})

    async def _on_rpc(self, msg: ClientMessage) -> None:
        """Forward the call to the application's backend (``--proxy-rpc-url``)."""
        assert self.identity is not None
        backend = self.services.backend
        if backend is None or not backend.enabled("rpc"):
            raise UnknownType("rpc is not enabled on this server (no --proxy-rpc-url)")
        data = await backend.rpc(self.identity.user, msg.field("method"), msg.body.get("data"))
        self.reply(msg, {"type": "rpc_result", "data": data})

    def _on_task(self, msg: ClientMessage) -> None:
        # Validated first, so unknown names and bad arguments are answered as
        # such even at the limit, and only known names become metric labels.
        services = self.services
        task, kwargs = services.pool.prepare(msg.field("name"), msg.body.get("args", {}))
        limit = services.settings.task_per_connection
        if self.tasks_in_flight >= limit:
            services.metrics.tasks.labels(task.name, "busy").inc()
            raise Busy(f"at most {limit} tasks in flight on one connection")
        self.tasks_in_flight += 1
        services.spawn(self._run_task(msg, task, kwargs))

    async def _run_task(self, msg: ClientMessage, task: Task, kwargs: dict[str, Any]) -> None:
        try:
            if self.closed or self.ended_with is not None:
                # Closed before this coroutine first ran: on_closed has already
                # cancelled this connection's tasks, and would miss this one.
                return
            # The user's share and fair turn; this session owns it (on_closed cancels).
            value = await self.services.pool.execute(task, kwargs, user=self.user, owner=self)
        except MessageError as error:
            self.reply_error(error, msg.id)
        except Exception:
            log.exception("task %s failed for user=%s", task.name, escape(self.user))
            self.reply_error(TaskFailed("the task failed"), msg.id)
        else:
            self.reply(msg, {"type": "result", "name": task.name, "value": value})
        finally:
            self.tasks_in_flight -= 1

    def _on_refresh(self, msg: ClientMessage) -> None:
        assert self.identity is not None
        identity = self.services.verifier.verify(msg.field("token"))  # CloseError → 4001
        if identity.user != self.identity.user:
            raise TokenInvalid("invalid token: issued for another user")
        self.identity = identity
        self._schedule_expiry()
        self.reply(msg, {"type": "refreshed", "expires_at": int(identity.expires_at)})
        # Grants may have shrunk: leave every room the new token no longer grants.
        self.services.spawn(self.services.hub.recheck_grants(self))

    _SYNC: ClassVar[dict[str, Handler]] = {
        "ping": _on_ping,
        "echo": _on_echo,
        "task": _on_task,
        "refresh": _on_refresh,
    }
    _ASYNC: ClassVar[dict[str, AsyncHandler]] = {
        "join": _on_join,
        "leave": _on_leave,
        "publish": _on_publish,
        "presence": _on_presence,
        "rpc": _on_rpc,
    }

    # --- live tokens -----------------------------------------------------------

    def _schedule_expiry(self) -> None:
        """``token_expiring`` before ``exp``, then close 4001 at ``exp`` (+ leeway)."""
        assert self.identity is not None
        self._cancel_timer()
        if self.identity.expires_at == math.inf:
            return  # a connect proxy's session without an end
        remaining = self.identity.expires_at - self._wall()
        warning = min(self.services.settings.token_warning, max(remaining, 0.0) / 2)
        self._timer = self.transport.call_later(max(0.0, remaining - warning),
                                                self._warn_expiring)

    def _warn_expiring(self) -> None:
        if self.identity is None or self.ended_with is not None:
            return
        self.send({"type": "token_expiring", "expires_at": int(self.identity.expires_at)})
        close_in = self.identity.expires_at + self.services.settings.jwt_leeway - self._wall()
        self._timer = self.transport.call_later(max(0.0, close_in), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self.end(TokenExpired())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- keepalive -------------------------------------------------------------

    def keepalive(self, now: float, interval: float) -> None:
        """Ping when due; drop the peer when its last ping went unanswered.

        The server calls this for every connection from one periodic sweep,
        instead of a ping Task per connection.
        """
        if self.identity is None or self.ended_with is not None:
            return
        if self._pong_due is not None:
            if now >= self._pong_due:
                self.end(KeepaliveTimeout())
                self.transport.abort()  # the peer is not listening
            return
        if now >= self._next_ping:
            self._next_ping = now + interval
            self._pong_due = now + interval
            self.transport.ping()

    # --- slow consumers ----------------------------------------------------------

    def check_stalled(self, now: float, timeout: float) -> None:
        """Close a peer whose backlog has not shrunk for ``timeout`` seconds (4009).

        The server calls this from its periodic sweep. A lagging member gets no
        more room traffic, so a backlog that stays put means the peer reads
        nothing at all.
        """
        if self.ended_with is not None or self.closed:
            return
        backlog = self.transport.buffered()
        stalled = self._stalled
        if not backlog:
            self._stalled = None
        elif stalled is None or backlog < stalled[1]:
            self._stalled = (now, backlog)
        elif now - stalled[0] >= timeout:
            self.end(SlowConsumer(f"read nothing for {timeout:g} s", backlog=backlog))
            self.transport.abort()  # nothing it is sent will be read, a close frame neither

    # --- sending ---------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> bool:
        """Send one JSON message; False when the connection cannot take it."""
        try:
            payload = protocol.encode(message)
        except (ValueError, TypeError, UnicodeEncodeError):
            # Client-controlled values that cannot be encoded must never
            # abort the connection: answer without them.
            log.warning("cannot encode a %s reply for user=%s", escape(message.get("type")),
                        escape(self.user))
            payload = protocol.encode(InternalError("reply could not be encoded").as_reply())
        return self.send_prepared(Prepared(payload))

    def send_prepared(self, message: Prepared) -> bool:
        """Send a reply (or an answer, an error, a notice) to this connection.

        Replies may take the backlog up to twice ``--max-write-buffer`` (room
        traffic stops at once the bound, see :meth:`deliver`); a peer whose
        replies would pass that is closed with 4009, so its backlog never
        grows without bound.
        """
        if self.ended_with is not None or self.closed:
            return False
        transport = self.transport
        if transport.buffered() + len(message) > self._max_reply_buffer:
            self.end(SlowConsumer(backlog=transport.buffered()))
            return False
        return transport.send(message)

    @property
    def gone(self) -> bool:
        """True once the connection is closing or closed."""
        return self.ended_with is not None or self.closed

    def room_budget(self) -> int:
        """Bytes of room traffic this connection can still take (``--max-write-buffer``)."""
        return max(0, self._max_write_buffer - self.transport.buffered())

    def deliver(self, message: Prepared) -> bool:
        """Room traffic: sent, or False (nothing sent) when the backlog would pass
        ``--max-write-buffer``, or when the connection is gone. The hub then
        lets the member lag (see :mod:`wsserver.hub`): it is never closed for it."""
        if self.ended_with is not None or self.closed:
            return False
        transport = self.transport
        if transport.buffered() + len(message) > self._max_write_buffer:
            return False
        return transport.send(message)

    def drained(self) -> asyncio.Future[None]:
        """Resolves once the backlog is under a quarter of ``--max-write-buffer``
        (or the connection is gone)."""
        future = self._drained
        if future is None:
            future = self._drained = asyncio.get_running_loop().create_future()
            self._poll_drained()
        return future

    def _poll_drained(self) -> None:
        future = self._drained
        if future is None:
            return
        if self.gone or self.transport.buffered() <= self._max_write_buffer // 4:
            self._drained = None
            if not future.done():
                future.set_result(None)
            return
        self.transport.call_later(DRAIN_POLL, self._poll_drained)

    def reply(self, msg: ClientMessage, reply: dict[str, Any]) -> bool:
        if msg.id is not None:
            reply["id"] = msg.id
        return self.send(reply)

    def reply_error(self, error: MessageError, msg_id: MessageId | None) -> None:
        reply = error.as_reply()
        if msg_id is not None:
            reply["id"] = msg_id
        self.send(reply)

    def forbidden(self, message: str) -> Forbidden:
        """The ``forbidden`` error, counted."""
        self.services.metrics.rejections.labels("forbidden").inc()
        return Forbidden(message)

    # --- closing ---------------------------------------------------------------

    def end(self, error: CloseError) -> None:
        """Close with ``error``'s code and reason (the one place that does)."""
        if self.ended_with is not None or self.closed:
            return
        self.ended_with = error
        if isinstance(error, SlowConsumer):
            self.services.metrics.slow_consumers.inc()
            log.warning("slow consumer user=%s addr=%s: %s, %d bytes unsent; closing 4009",
                        escape(self.user), escape(self.address), error.detail,
                        error.backlog)
        self._resume()  # the peer's close frame must still be read
        self.transport.close(error.code, error.reason)

    def shut_down(self) -> None:
        """Close with 1001 because the server stops."""
        self.end(GoingAway())

    def on_closed(self, code: int, reason: str, by_server: bool) -> None:
        """The connection is gone: forget it everywhere, log and count it once."""
        if self.closed:
            return
        self.closed = True
        services = self.services
        self._cancel_timer()
        self._poll_drained()  # whoever waits for the backlog learns it is gone
        # Nobody will read the answers: free the workers for others.
        services.pool.cancel_owner(self)
        identity = self.identity
        last_of_user = services.registry.remove(self)
        if last_of_user is not None:
            services.message_buckets.discard(last_of_user)
        services.hub.forget(self)
        if self._in_gauge:
            # Not before: a client gone while the broker counted it was never added.
            services.metrics.connection_closed(self.transport.kind)
        if identity is not None and self._counted_in_broker:
            services.spawn(services.quietly(services.broker.user_disconnect(identity.user)))
        if self.ended_with is not None:
            code, reason, by = self.ended_with.code, self.ended_with.reason, "server"
        else:
            by = "server" if by_server else "client"
        services.metrics.closes.labels(metric_label(code)).inc()
        if identity is None:
            # Refused after the upgrade (4001, 4008): as cheap to repeat as a
            # refused handshake, so logged through the same throttle.
            logged, earlier = services.refusal_log.allow(self.limit_key)
            if earlier:
                log.info("%d more handshake refusals from %s suppressed", earlier,
                         escape(self.limit_key))
            if not logged:
                return
        detail = self.ended_with.detail if self.ended_with is not None else ""
        duration = self._clock() - self.opened_at
        # Two formats rather than a spliced string, so --log-format json sees
        # detail as a field of its own.
        if detail:
            log.info("close user=%s addr=%s code=%d by=%s reason=%r detail=%r duration=%.3fs",
                     escape(self.user), escape(self.address), code, by, reason, detail, duration)
        else:
            log.info("close user=%s addr=%s code=%d by=%s reason=%r duration=%.3fs",
                     escape(self.user), escape(self.address), code, by, reason, duration)


#: Every message type has exactly one handler (a unit test checks it too).
assert set(Session._SYNC) | set(Session._ASYNC) == protocol.MESSAGE_TYPES
assert not set(Session._SYNC) & set(Session._ASYNC)


def _unix(expires_at: float) -> int | None:
    """``expires_at`` as whole Unix seconds; None for no end."""
    return None if expires_at == math.inf else int(expires_at)


async def _all(futures: list[asyncio.Future[None]]) -> None:
    """Wait for every future in ``futures`` (each handles its own errors), emptying it."""
    while futures:
        await futures.pop(0)
