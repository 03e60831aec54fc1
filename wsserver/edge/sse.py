"""HTTP streaming (Server-Sent Events) for clients that cannot open a WebSocket.

Three routes (docs/protocol.md, "HTTP streaming"):

* ``POST /auth/ticket`` (:class:`TicketHandler`) trades the JWT of an
  ``Authorization: Bearer`` header for a single-use ticket that lives
  :data:`TICKET_TTL` seconds, because ``EventSource`` cannot set headers and
  the JWT must never travel in a URL. Tickets are kept in the broker, so any
  node (any ``--workers`` process) takes a ticket another issued.
* ``GET /sse`` (:class:`StreamHandler`) runs the WebSocket handshake's checks
  in the same order (:mod:`wsserver.admission`; without a token, the connect
  proxy is asked with ``"transport": "sse"`` when one is configured), then answers
  ``text/event-stream`` and hands the stream to a :class:`~wsserver.session.Session`
  over :class:`SseTransport`: each server message is one event whose
  ``data:`` is the JSON a WebSocket client gets, the first one the
  ``welcome`` with a ``session`` id. A bad token is answered as on ``/ws``
  after the upgrade: the stream starts and its only event is
  ``{"type": "close", "code": 4001, ...}`` (an ``EventSource`` cannot read an
  HTTP status, but it reads that); so is 4008 for a user over its cap.
* ``POST /sse/send`` (:class:`SendHandler`) takes one client message for the
  stream named by ``X-Session``; replies arrive on the stream. A stream lives
  on one process: a message that reaches another one is forwarded to it
  through the broker (:meth:`~wsserver.brokers.base.Broker.forward`).

Back-pressure: while the session has paused reading (its queue is full), a
``POST /sse/send`` waits, up to :data:`SEND_WAIT` seconds, for the session
to take its message, so the client's next one waits too; at most
:data:`MAX_HELD` wait per stream. Past either bound it is answered 503 with
``Retry-After``, and the message was not taken.

Keepalive: the server's sweep pings every connection each ``--ping-interval``;
on a stream the ping is the comment ``: keepalive``, which proxies see as
traffic. An ``EventSource`` cannot answer, so the transport reports the pong
itself once the kernel has taken the comment: a client that stopped reading
(its socket buffer full) never takes it and is closed as a dead peer is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPHeaders
from tornado.iostream import IOStream, StreamClosedError

from wsserver.admission import Arrival, admit, check_arrival
from wsserver.auth import Credentials, extract_token
from wsserver.brokers.base import Broker, BrokerUnavailable
from wsserver.edge.handlers import BaseHandler
from wsserver.edge.refusal import refuse
from wsserver.errors import (
    CloseError,
    DependencyUnavailable,
    OriginRejected,
    Rejection,
    TokenInvalid,
)
from wsserver.logsafe import redact
from wsserver.services import Services
from wsserver.session import Session
from wsserver.transport import Prepared, Receiver, TimerHandle

log = logging.getLogger("wsserver.connection")

#: Seconds a ticket from ``POST /auth/ticket`` stays valid (CONTRACT: 30).
TICKET_TTL = 30
#: Longest ticket looked up (``secrets.token_urlsafe(32)`` is 43 characters).
MAX_TICKET_LENGTH = 64
#: Seconds a ``POST /sse/send`` waits for a session that paused reading.
SEND_WAIT = 10.0
#: ``POST /sse/send`` requests that may wait on one stream at once.
MAX_HELD = 16
#: Seconds a stream that the server closed may take to flush its close event.
CLOSE_TIMEOUT = 2.0
#: What the server records for a stream that the client ended: HTTP carries
#: no close code, so "no status received" (RFC 6455 section 7.1.5).
CLIENT_GONE = 1005
#: The comment a keepalive writes (lines starting with ":" are ignored by clients).
KEEPALIVE = b": keepalive\n\n"
#: A session id: the node tag of the broker that issued it, a dot, 32 random bytes.
SESSION_ID = re.compile(r"([A-Za-z0-9_-]{8})\.[A-Za-z0-9_-]{43}")
#: The 403's message when a stream request carries no token.
NO_TOKEN = ("no token: send 'Authorization: Bearer <jwt>', or ?ticket=<ticket> from "
            "POST /auth/ticket")
#: Shared by every stream once its handshake headers are dropped.
_NO_HEADERS = HTTPHeaders()
#: Request headers a cross-origin page may send (CORS preflight).
ALLOWED_HEADERS = "Authorization, Content-Type, X-Session"


def event(payload: bytes) -> bytes:
    """One Server-Sent Event whose data is ``payload`` (a server message's JSON).

    The server's JSON has no raw line breaks; if one ever had, each line
    becomes a ``data:`` line of its own, which a client joins back with "\\n"
    (whitespace between JSON tokens), so the event is still the same JSON.
    """
    if b"\n" in payload or b"\r" in payload:
        lines = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return b"".join(b"data: %s\n" % line for line in lines) + b"\n"
    return b"data: " + payload + b"\n\n"


def chunk(data: bytes) -> bytes:
    """``data`` framed as one HTTP/1.1 chunk (RFC 9112 section 7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def event_chunk(payload: bytes) -> bytes:
    """:func:`event` as one chunk: what an HTTP/1.1 stream writes for a message.

    The :class:`~wsserver.transport.Prepared` encoding of streams, so that a
    fan-out frames the chunk once for every streaming member, and a member
    sent only that message in a turn of the loop writes it as it is. (Several
    chunks in a row are still valid chunked encoding.)
    """
    return chunk(event(payload))


#: The keepalive comment, as one chunk.
KEEPALIVE_CHUNK = chunk(KEEPALIVE)


def close_event(code: int, reason: str) -> bytes:
    """The event that ends a stream: ``{"type": "close", "code": C, "reason": R}``."""
    return event(json.dumps({"type": "close", "code": code, "reason": reason},
                            separators=(",", ":")).encode())


class StreamGone(Exception):
    """The stream is closed: a message for it is answered 404."""


class StreamBusy(Exception):
    """The stream has :data:`MAX_HELD` messages waiting already (503)."""


class _Flusher:
    """Writes out, once per turn of the loop, what each stream was sent.

    A broadcast hands every member its event at once; a stream sent several
    events in one step gets them in one write, hence one ``send`` system call.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._dirty: list[SseTransport] = []

    def add(self, transport: SseTransport) -> None:
        if not self._dirty:
            self.loop.call_soon(self._run)
        self._dirty.append(transport)

    def _run(self) -> None:
        dirty, self._dirty = self._dirty, []
        for transport in dirty:
            try:
                transport.flush()
            except Exception:
                log.exception("stream write failed; aborting the stream")
                transport.abort()


_local = threading.local()


def _flusher(loop: asyncio.AbstractEventLoop) -> _Flusher:
    """This thread's flusher, for ``loop`` (tests run one loop after another)."""
    flusher: _Flusher | None = getattr(_local, "flusher", None)
    if flusher is None or flusher.loop is not loop:
        flusher = _local.flusher = _Flusher(loop)
    return flusher


class SseTransport:
    """:class:`~wsserver.transport.Transport` over one ``text/event-stream`` response.

    Messages become events framed as HTTP/1.1 chunks (:func:`event_chunk`,
    built once per message for every streaming member: :meth:`Prepared.encoded`),
    batched per connection and per turn of the loop, and written in one write.
    Messages in come from ``POST /sse/send`` through :meth:`hand`.

    ``on_gone(code, reason, by_server)`` is called exactly once, when the
    stream has ended (the Session's ``on_closed``); ``done`` resolves then.
    """

    kind = "sse"

    def __init__(self, handler: tornado.web.RequestHandler, session_id: str) -> None:
        self.session_id = session_id
        self._handler = handler
        connection = handler.request.connection
        assert isinstance(connection, HTTP1Connection)
        self._stream: IOStream = connection.stream
        # Exactly IOStream: an SSLIOStream must encrypt.
        self._socket: socket.socket | None = (
            self._stream.socket if type(self._stream) is IOStream else None
        )
        # As Tornado decides when it writes the headers of a GET's answer with
        # no Content-Length: chunked for HTTP/1.1, until the close for 1.0.
        self._chunked = handler.request.version == "HTTP/1.1"
        #: Bytes handed to the stream whose write has not completed yet (each
        #: IOStream.write future resolves once its own bytes are written).
        self._in_stream = 0
        self._encoding = event_chunk if self._chunked else event
        self._loop = asyncio.get_running_loop()
        self._batch: list[bytes] = []
        self._batch_size = 0
        self._ping_in_batch = False
        #: Gets the client's messages once the session is open.
        self.receiver: Receiver | None = None
        self.on_gone: Callable[[int, str, bool], None] | None = None
        self.done: asyncio.Future[None] = self._loop.create_future()
        #: True from close(), abort() or the client's leaving on: nothing more is sent.
        self.closing = False
        self._closed_with: tuple[int, str] | None = None
        self._gone = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._paused = False
        #: Messages waiting while reading is paused (made on first use: most
        #: streams never pause, and an empty deque is 600 bytes).
        self._held: deque[tuple[str, asyncio.Future[None]]] | None = None

    # --- out -------------------------------------------------------------------

    def send(self, message: Prepared) -> bool:
        if self.closing:
            return False
        self._queue(message.encoded(self._encoding))
        return True

    def ping(self) -> None:
        """The keepalive comment; its "pong" is reported once the kernel took it."""
        if self.closing:
            return
        self._queue(KEEPALIVE_CHUNK if self._chunked else KEEPALIVE)
        self._ping_in_batch = True

    def buffered(self) -> int:
        return self._batch_size + (0 if self._stream.closed() else self._in_stream)

    def _queue(self, data: bytes) -> None:
        if not self._batch:
            _flusher(self._loop).add(self)
        self._batch.append(data)
        self._batch_size += len(data)

    def flush(self) -> None:
        """Write what was queued this turn (chunks already framed), in one write."""
        batch = self._batch
        if not batch:
            return
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        self._batch = []
        self._batch_size = 0
        ping, self._ping_in_batch = self._ping_in_batch, False
        stream = self._stream
        if self._gone or stream.closed():
            return
        sock = self._socket
        if sock is not None and not self._in_stream:
            # Nothing queued: hand it to the kernel ourselves, as IOStream would,
            # minus its Future and buffer bookkeeping (as TornadoTransport does);
            # what the kernel does not take, and any error, go through
            # IOStream.write, which queues it or closes the stream.
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                if ping:
                    self._ponged()
                return
            data = data[sent:]
        try:
            written = stream.write(data)
        except StreamClosedError:
            return
        size = len(data)
        self._in_stream += size
        written.add_done_callback(lambda _: self._written(size))
        if ping:
            written.add_done_callback(self._pinged)

    def _written(self, size: int) -> None:
        self._in_stream -= size

    def _pinged(self, written: asyncio.Future[None]) -> None:
        # Tornado marks a failed write's exception as retrieved itself.
        if not written.cancelled() and written.exception() is None:
            self._ponged()

    def _ponged(self) -> None:
        # An EventSource cannot answer a ping: the comment counts as answered
        # once the kernel took it.
        if self.receiver is not None and not self.closing:
            self.receiver.on_pong(b"")

    # --- closing ---------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Send the ``close`` event and end the response; idempotent."""
        if self.closing:
            return
        close = close_event(code, reason)
        self._queue(chunk(close) if self._chunked else close)
        self.closing = True
        self._closed_with = (code, reason)
        self._drop_held()
        self.flush()
        finished = self._handler.finish()
        finished.add_done_callback(lambda _: self._end(code, reason, True))
        # A client that does not read would keep the close event (and the
        # connection) forever: cut it after CLOSE_TIMEOUT.
        self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self.abort)

    def abort(self) -> None:
        """Cut the connection now."""
        self.closing = True
        if not self._stream.closed():
            self._stream.close()
        code, reason = self._closed_with or (1006, "")
        self._end(code, reason, True)

    def client_gone(self) -> None:
        """The client closed the connection (Tornado's ``on_connection_close``)."""
        if self._closed_with is not None:
            self._end(*self._closed_with, True)
        else:
            self._end(CLIENT_GONE, "", False)

    def _end(self, code: int, reason: str, by_server: bool) -> None:
        if self._gone:
            return
        self._gone = True
        self.closing = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._drop_held()
        if self.on_gone is not None:
            self.on_gone(code, reason, by_server)
        if not self.done.done():
            self.done.set_result(None)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return self._loop.call_later(delay, callback)

    # --- in --------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Messages held while reading is paused (their POSTs wait)."""
        return len(self._held) if self._held else 0

    def pause_reading(self) -> None:
        """Hold the messages that arrive (their POSTs wait) until :meth:`resume_reading`."""
        self._paused = True

    def resume_reading(self) -> None:
        """Hand over what was held, in order, until paused again."""
        self._paused = False
        held = self._held
        while held and not self._paused and not self.closing:
            text, waiter = held.popleft()
            if waiter.done():
                continue  # its POST gave up (503): the client sends it again
            waiter.set_result(None)
            self._receive(text)

    def hand(self, text: str) -> Awaitable[None] | None:
        """Give the session one client message, in arrival order.

        Returns None when it was taken now, else an awaitable that resolves
        once it is taken (reading is paused); cancelling it withdraws the
        message.

        Raises:
            StreamGone: the stream is closed (or closing).
            StreamBusy: :data:`MAX_HELD` messages wait already.
        """
        if self.closing:
            raise StreamGone()
        if not self._paused and not self._held:
            self._receive(text)
            return None
        held = self._held
        if held is None:
            held = self._held = deque()
        if len(held) >= MAX_HELD:
            self._held = held = deque(item for item in held if not item[1].done())
            if len(held) >= MAX_HELD:
                raise StreamBusy()
        waiter: asyncio.Future[None] = self._loop.create_future()
        held.append((text, waiter))
        return waiter

    def hand_forwarded(self, text: str) -> None:
        """A message another node took (and answered 202) for this stream.

        Nobody waits for it, so when :data:`MAX_HELD` wait already it goes to
        the session at once: the session's own queue bound applies then, as
        for a WebSocket client that keeps sending.
        """
        try:
            self.hand(text)
        except StreamGone:
            return
        except StreamBusy:
            self._receive(text)

    def _receive(self, text: str) -> None:
        if self.receiver is not None:
            self.receiver.on_text(text)

    def _drop_held(self) -> None:
        held, self._held = self._held, None
        for _, waiter in held or ():
            if not waiter.done():
                waiter.set_exception(StreamGone())
                waiter.exception()  # answered by its POST, or by nobody


class Streams:
    """This node's open streams by session id, and the way to the others'.

    Registers itself with the broker for the messages other nodes forward
    to this one (``POST /sse/send`` that reached another ``--workers``
    process or node).
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._by_id: dict[str, SseTransport] = {}
        broker.serve_forwarded(self._forwarded)

    def new_id(self) -> str:
        """An unguessable session id that names this node (its broker's tag)."""
        return f"{self.broker.node_tag}.{secrets.token_urlsafe(32)}"

    def add(self, transport: SseTransport) -> None:
        self._by_id[transport.session_id] = transport

    def discard(self, transport: SseTransport) -> None:
        if self._by_id.get(transport.session_id) is transport:
            del self._by_id[transport.session_id]

    def get(self, session_id: str) -> SseTransport | None:
        return self._by_id.get(session_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def _forwarded(self, session_id: str, text: str) -> None:
        transport = self._by_id.get(session_id)
        if transport is None:
            log.debug("forwarded message for a stream that is gone; dropped")
            return
        transport.hand_forwarded(text)


# --- handlers --------------------------------------------------------------------


class StreamingHandler(BaseHandler):
    """CORS for the configured origins, on the three streaming routes.

    A page on another origin than the server (``--allowed-origins
    https://app.example.com``) needs it to read these answers: the exact
    origin is echoed, never ``*``, and no cookie is ever asked for
    (``Access-Control-Allow-Credentials`` stays off: tokens travel in headers).
    """

    methods = "GET"

    def allow_origin(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin and self.services.origins.allows(origin):
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Expose-Headers", "Retry-After")
        self.add_header("Vary", "Origin")

    def arrival(self) -> Arrival:
        """What the handshake's arrival checks need of this request (a stream's
        handshake, or the ticket that stands for its first step)."""
        headers = self.request.headers
        return Arrival(self.limit_key, self.client_address, headers.get("Origin"), headers.get,
                       "sse")

    def options(self, *args: Any) -> None:
        """The CORS preflight of a cross-origin ``fetch``: allowed origins only."""
        origin = self.request.headers.get("Origin")
        if not origin or not self.services.origins.allows(origin):
            self.write_json({"error": "origin", "message": "origin not allowed"}, 403)
            return
        self.allow_origin()
        self.set_header("Access-Control-Allow-Methods", self.methods)
        self.set_header("Access-Control-Allow-Headers", ALLOWED_HEADERS)
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def answer(self, status: int, error: str, message: str,
               retry_after: float | None = None) -> None:
        """An error answer, as the server API's: ``{"error", "message"}``."""
        if retry_after is not None:
            self.set_header("Retry-After", str(max(1, round(retry_after))))
        self.write_json({"error": error, "message": message}, status)


class TicketHandler(StreamingHandler):
    """``POST /auth/ticket``: a single-use ticket for ``GET /sse?ticket=``.

    The same arrival checks as a handshake (draining 503, origin 403,
    handshake rate 429), refused, counted and logged as a handshake is, then
    the bearer token must verify (401 otherwise).
    The ticket is logged nowhere; it stands for the token for
    :data:`TICKET_TTL` seconds, once.
    """

    methods = "POST"

    async def post(self) -> None:
        services = self.services
        self.allow_origin()
        arrival = self.arrival()
        try:
            check_arrival(services, arrival)
        except Rejection as rejection:
            # The first step of a stream's handshake: counted and logged as one.
            refuse(self, services, rejection, limit_key=self.limit_key,
                   client_address=self.client_address)
            return
        credentials = extract_token(self.request.headers.get("Authorization"), (), None)
        if credentials is None:
            services.metrics.tickets.labels("unauthorized").inc()
            self.answer(401, "unauthorized", "send 'Authorization: Bearer <jwt>'")
            return
        try:
            # As a handshake would: a kid the key set lacks waits for one refetch.
            await services.verifier.verify_fresh(credentials.token)
        except CloseError as error:
            services.metrics.tickets.labels("unauthorized").inc()
            self.answer(401, "unauthorized", error.reason)
            return
        ticket = secrets.token_urlsafe(32)
        try:
            await services.broker.ticket_put(ticket, credentials.token, TICKET_TTL)
        except BrokerUnavailable as error:
            services.metrics.tickets.labels("unavailable").inc()
            self.answer(503, "unavailable", "the broker is unavailable; retry later",
                        error.retry_after)
            return
        services.metrics.tickets.labels("issued").inc()
        self.write_json({"ticket": ticket, "expires_in": TICKET_TTL})


class StreamHandler(StreamingHandler):
    """``GET /sse``: the handshake's checks, then a Session over an event stream."""

    def initialize(self, services: Services, streams: Streams) -> None:  # type: ignore[override]
        super().initialize(services)
        self.streams = streams
        self.transport: SseTransport | None = None
        self._client_gone = False
        #: A refused handshake logs its own line instead of the access line.
        self.quiet_access_log = False
        #: A stream's access line is at DEBUG: its "open"/"close" lines say more.
        self.streamed = False

    async def get(self) -> None:
        services = self.services
        self.allow_origin()
        arrival = self.arrival()
        try:
            check_arrival(services, arrival)
            credentials, verdict = await self._credentials()
            admitted = await admit(services, arrival, credentials, no_token=NO_TOKEN,
                                   verdict=verdict)
        except Rejection as rejection:
            refuse(self, services, rejection, limit_key=self.limit_key,
                   client_address=self.client_address)
            return
        if self._client_gone:  # left while its ticket (or the backend) was asked
            services.registry.release(admitted.reservation)
            return
        self._start_stream()
        transport = self.transport = SseTransport(self, self.streams.new_id())
        session = Session(services, transport, self.client_address, self.limit_key)
        transport.on_gone = session.on_closed
        services.registry.transfer(admitted.reservation, session)
        self._release_handshake()
        try:
            opened = await session.open(admitted.credentials, admitted.verdict,
                                        welcome={"session": transport.session_id})
            if opened and not transport.closing:
                # Messages are taken only once the session is open, and only
                # for an open session: a refused one is never found.
                transport.receiver = session
                self.streams.add(transport)
            await transport.done
        finally:
            self.streams.discard(transport)

    async def _credentials(self) -> tuple[Credentials | None, CloseError | None]:
        """The bearer header's token, else the ticket's (taken: single use).

        A ticket that is unknown, used or expired is a bad token (4001 on the
        stream, ``invalid ticket``), not a missing one.

        Raises:
            DependencyUnavailable: the broker holding the tickets cannot be reached (503).
        """
        credentials = extract_token(self.request.headers.get("Authorization"), (), None)
        if credentials is not None:
            return credentials, None
        ticket = self.get_query_argument("ticket", None)
        if not ticket:
            return None, None
        token: str | None = None
        if len(ticket) <= MAX_TICKET_LENGTH:
            try:
                token = await self.services.broker.ticket_take(ticket)
            except BrokerUnavailable as error:
                raise DependencyUnavailable("the broker is unavailable; retry later",
                                  retry_after=error.retry_after) from None
        if token is None:
            invalid = TokenInvalid("invalid ticket")
            invalid.detail = "ticket unknown, used already or expired"
            return Credentials("", "ticket"), invalid
        return Credentials(token, "ticket"), None

    def _start_stream(self) -> None:
        self.streamed = True
        self.set_status(200)
        self.set_header("Content-Type", "text/event-stream")
        # nginx: pass each event on at once, whatever proxy_buffering says.
        self.set_header("X-Accel-Buffering", "no")
        self.flush()

    def _release_handshake(self) -> None:
        """Drop what only the handshake needed (as the WebSocket handler does)."""
        request = self.request
        request.headers = _NO_HEADERS
        request.uri = redact(request.uri or "")
        request.arguments = {}
        request.query_arguments = {}
        # The response's headers are out: nothing reads them again.
        self._headers = _NO_HEADERS

    def on_connection_close(self) -> None:
        self._client_gone = True
        if self.transport is not None:
            self.transport.client_gone()


@tornado.web.stream_request_body
class SendHandler(StreamingHandler):
    """``POST /sse/send``: one client message for the stream named by ``X-Session``.

    Answers 202 once the session took the message (replies and errors go on
    the stream); 404 for a session that is unknown or closed; 413 for a body
    over ``--max-message-size``; 403 for a foreign ``Origin``; 415 unless the
    body is declared ``application/json``; 503 with ``Retry-After`` while the
    session cannot take it (see the module's "Back-pressure") or the broker
    that would forward it is down.

    CSRF: the session id is a bearer secret that no cookie carries, sent in a
    custom header that a cross-site form cannot set and a cross-site
    ``fetch`` can set only after a CORS preflight, which names allowed
    origins only; the origin and content-type checks stop the rest.
    """

    methods = "POST"

    def initialize(self, services: Services, streams: Streams) -> None:  # type: ignore[override]
        super().initialize(services)
        self.streams = streams
        self._body = bytearray()
        self._refused = False

    def prepare(self) -> None:
        """Every check the headers allow, before the body is read."""
        if self.request.method != "POST":
            return
        self.allow_origin()
        limit = self.services.settings.max_message_size
        declared = self.request.headers.get("Content-Length", "")
        length = int(declared) if declared.isdigit() else 0
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            # After an early answer Tornado reads on until the connection
            # closes: its own cap must not cut in with a second answer. A
            # chunked body declares no length: read up to twice the limit
            # (keeping limit + 1 bytes) to answer 413; Tornado cuts beyond.
            connection.set_max_body_size(max(limit, length) if declared else 2 * limit)
        try:
            self.services.origins.check(self.request.headers.get("Origin"))
        except OriginRejected as rejection:
            self._refuse(403, "origin", rejection.message, "origin")
            return
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            self._refuse(415, "bad_request", "send the message as application/json",
                         "bad_request")
            return
        if length > limit:
            self._refuse(413, "too_large", f"message over {limit} bytes", "too_large")
            return
        session_id = self.request.headers.get("X-Session", "")
        if not SESSION_ID.fullmatch(session_id) or not (
            self.streams.get(session_id) is not None or self._tag(session_id) is not None
        ):
            self._refuse(404, "unknown_session", "no open stream with this X-Session",
                         "unknown_session")

    def _tag(self, session_id: str) -> str | None:
        """The node tag of another node's session id; None for this node's."""
        tag = session_id.split(".", 1)[0]
        return None if tag == self.streams.broker.node_tag else tag

    def _refuse(self, status: int, error: str, message: str, outcome: str,
                retry_after: float | None = None) -> None:
        self._refused = True
        self.services.metrics.stream_sends.labels(outcome).inc()
        self.answer(status, error, message, retry_after)

    def data_received(self, chunk: bytes) -> None:
        if not self._refused and len(self._body) <= self.services.settings.max_message_size:
            self._body += chunk

    async def post(self) -> None:
        if self._refused:
            return
        limit = self.services.settings.max_message_size
        if len(self._body) > limit:  # a chunked body declares no length
            self._refuse(413, "too_large", f"message over {limit} bytes", "too_large")
            return
        try:
            text = self._body.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(400, "bad_request", "the message is not UTF-8", "bad_request")
            return
        session_id = self.request.headers["X-Session"]
        transport = self.streams.get(session_id)
        if transport is None:
            await self._forward(session_id, text)
            return
        try:
            taken = transport.hand(text)
            if taken is not None:
                await asyncio.wait_for(taken, SEND_WAIT)
        except StreamGone:
            self._refuse(404, "unknown_session", "the stream is closed", "unknown_session")
            return
        except (StreamBusy, TimeoutError):
            self._refuse(503, "busy", "the session is not taking messages yet; send this "
                         "one again", "busy", retry_after=1)
            return
        self.services.metrics.stream_sends.labels("accepted").inc()
        self.write_json({}, 202)

    async def _forward(self, session_id: str, text: str) -> None:
        tag = self._tag(session_id)
        if tag is None:  # this node's, and gone since prepare()
            self._refuse(404, "unknown_session", "the stream is closed", "unknown_session")
            return
        try:
            reached = await self.services.broker.forward(tag, session_id, text)
        except BrokerUnavailable as error:
            self._refuse(503, "unavailable", "the broker is unavailable; retry later",
                         "unavailable", retry_after=error.retry_after)
            return
        if not reached:
            self._refuse(404, "unknown_session", "no open stream with this X-Session",
                         "unknown_session")
            return
        self.services.metrics.stream_sends.labels("forwarded").inc()
        self.write_json({}, 202)
