"""A WebSocket handshake on ``/ws``, decided once for both ways a request arrives.

A request reaches the decision either through Tornado's HTTP server
(``handlers.WebSocketHandler``: TLS, and any head the native path does not
take) or through the native path (``wsserver.edge.native``: a plain-TCP
upgrade whose head was read at accept time). Both hand :func:`decide` the
same values (the HTTP version, a header lookup, the query's token, the client
address) and answer what it returns, so the contract's order, statuses,
``Retry-After`` and bodies cannot differ between them:

1. not an ``Upgrade: websocket`` request: 400 (:class:`Answer`);
2. HTTP/1.0: 400 (a :class:`Refused`, as every check below);
3. :func:`wsserver.admission.check_arrival`: draining 503, origin 403,
   handshake rate 429;
4. the token (header, subprotocol, query), then :func:`wsserver.admission.admit`:
   verification, the caps (503, 429), no token 403, the connect proxy;
5. the client left meanwhile: nothing to answer (None);
6. the rest of RFC 6455 section 4.2.1 (``Connection``, version, ``Host``,
   key): 400 or 426 (:class:`Answer`);
7. :class:`Upgraded`: the 101's bytes, with ``bearer`` selected when the
   token came as a subprotocol and permessage-deflate when negotiated.

After the 101, :func:`open_session` runs the connection's
:class:`~wsserver.session.Session` (token verdict 4001, the per-user cap
4008, the welcome), the same on both paths.

Pure core: no Tornado, no socket.
"""

from __future__ import annotations

import base64
import hashlib
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

from wsserver import deflate
from wsserver.admission import Admitted, Arrival, admit, check_arrival
from wsserver.auth import BEARER_SUBPROTOCOL, extract_token
from wsserver.deflate import Deflate
from wsserver.errors import BadHandshake, Rejection
from wsserver.httphead import RequestHead
from wsserver.session import Session
from wsserver.transport import Receiver, Transport

if TYPE_CHECKING:
    from wsserver.services import Services

#: The path of the WebSocket endpoint.
PATH = "/ws"
#: The 403's message when a handshake carries no token.
NO_TOKEN = ("no token: send 'Authorization: Bearer <jwt>', the subprotocols 'bearer, <jwt>', "
            "or ?token=<jwt>")
#: RFC 6455 section 4.2.2: the GUID appended to the client's key.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Tornado's ``RequestHandler._remove_control_chars_regex``, as a table: what
#: a query argument's control characters become (a space).
_CONTROL_TO_SPACE = {c: " " for c in (*range(0x00, 0x09), *range(0x0E, 0x20))}


class UpgradeRequest(NamedTuple):
    """What :func:`decide` needs of a request, however it was read."""

    #: ``HTTP/1.1`` (or ``HTTP/1.0``, refused).
    version: str
    #: The request's header lookup (case-insensitive).
    header: Callable[[str], str | None]
    #: The ``token`` query argument, read when the token is looked for (Tornado's
    #: reading can answer 400 on bytes that are not UTF-8, after the arrival checks).
    query_token: Callable[[], str | None]
    #: The client address (``--trusted-proxies`` applied) and its limit key.
    address: str
    limit_key: str
    #: True when the client has gone (asked after the awaited checks).
    gone: Callable[[], bool]


class Answer(NamedTuple):
    """A plain HTTP answer: not an upgrade Tornado's WebSocket handler would take."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


class Refused(NamedTuple):
    """A check of the contract's table failed: its JSON answer, and the connection closed."""

    rejection: Rejection


class Upgraded(NamedTuple):
    """Past every check: the 101 to send, and what the connection was admitted with.

    ``admitted.reservation`` holds the registry slot: :func:`open_session`
    takes it over, or the caller gives it back when the 101 cannot be sent.
    """

    admitted: Admitted
    #: The 101's status line and headers, through the blank line.
    response: bytes
    #: The negotiated permessage-deflate parameters, or None.
    deflate: Deflate | None
    address: str
    limit_key: str


Decision = Answer | Refused | Upgraded


async def decide(
    services: Services, request: UpgradeRequest, *, compression: bool
) -> Decision | None:
    """The answer to a ``GET /ws``, in the order of the module's docstring.

    ``compression``: negotiate permessage-deflate when the client offers it.
    Returns None when the client left while the checks waited (the registry
    slot is then given back).
    """
    header = request.header
    if (header("Upgrade") or "").lower() != "websocket":
        return Answer(400, 'Can "Upgrade" only to "WebSocket".')
    try:
        if request.version == "HTTP/1.0":
            # RFC 6455 section 4.2.1: "an HTTP/1.1 or higher GET request".
            raise BadHandshake("a WebSocket upgrade needs HTTP/1.1 or higher")
        arrival = Arrival(request.limit_key, request.address, header("Origin"), header,
                          "websocket")
        check_arrival(services, arrival)
        offered = offered_subprotocols(header("Sec-WebSocket-Protocol"))
        credentials = extract_token(header("Authorization"), offered, request.query_token())
        admitted = await admit(services, arrival, credentials, no_token=NO_TOKEN)
    except Rejection as rejection:
        return Refused(rejection)
    registry = services.registry
    if _may_have_waited(services) and request.gone():
        # Left while the backend or the key set answered: nothing to upgrade.
        registry.release(admitted.reservation)
        return None
    # The origin was checked with the arrival (403 with a JSON body).
    problem = upgrade_problem(header, None)
    if problem is not None:
        registry.release(admitted.reservation)
        return problem
    subprotocol = BEARER_SUBPROTOCOL if admitted.credentials.source == "subprotocol" else None
    negotiated = None
    extension = None
    if compression:
        accepted = deflate.negotiate(header("Sec-WebSocket-Extensions"))
        if accepted is not None:
            negotiated, extension = accepted
    key = header("Sec-WebSocket-Key")
    assert key is not None  # upgrade_problem
    return Upgraded(admitted, switching_protocols(key, subprotocol, extension), negotiated,
                    request.address, request.limit_key)


def _may_have_waited(services: Services) -> bool:
    """Whether the checks may have waited for something (a key set's refetch,
    the connect proxy): only then can the client have gone meanwhile."""
    backend = services.backend
    return services.key_set is not None or (backend is not None and backend.enabled("connect"))


def upgrade_problem(
    header: Callable[[str], str | None], origin_allowed: Callable[[str], bool] | None
) -> Answer | None:
    """Why a request cannot be upgraded (RFC 6455 section 4.2.1), as its
    answer, or None. ``origin_allowed``: the origin check, when it was not
    done already."""
    if (header("Upgrade") or "").lower() != "websocket":
        return Answer(400, 'Can "Upgrade" only to "WebSocket".')
    connection = (header("Connection") or "").lower()
    if connection != "upgrade" and "upgrade" not in (s.strip() for s in connection.split(",")):
        return Answer(400, '"Connection" must be "Upgrade".')
    if origin_allowed is not None:
        origin = header("Origin")
        if origin is not None and not origin_allowed(origin):
            return Answer(403, "Cross origin websockets not allowed")
    if header("Sec-WebSocket-Version") != "13":
        # Section 4.4: the versions we speak follow.
        return Answer(426, "Upgrade Required", (("Sec-WebSocket-Version", "13"),))
    if not (header("Host") and header("Sec-WebSocket-Key")):
        return Answer(400, "Missing/Invalid WebSocket headers")
    return None


def offered_subprotocols(header: str | None) -> list[str]:
    """The ``Sec-WebSocket-Protocol`` list, names stripped, empty ones dropped."""
    if not header:
        return []
    return [name.strip() for name in header.split(",") if name.strip()]


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _ACCEPT_GUID).digest()).decode()


def switching_protocols(key: str, subprotocol: str | None = None,
                        extension: str | None = None) -> bytes:
    """The 101's status line and headers (RFC 6455 section 4.2.2), through the blank line."""
    response = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_value(key) + "\r\n")
    if subprotocol:
        response += "Sec-WebSocket-Protocol: " + subprotocol + "\r\n"
    if extension:
        response += "Sec-WebSocket-Extensions: " + extension + "\r\n"
    return (response + "\r\n").encode("latin-1")


# --- the native path's part -----------------------------------------------------------


class NotNative(ValueError):
    """A request the native path leaves to Tornado (which answers it as before)."""


def native_request(head: RequestHead) -> str | None:
    """For a head the native path may answer itself, the ``token`` query argument
    (None when absent); :class:`NotNative` for any other.

    The native path takes a ``GET /ws`` upgrade over HTTP/1.1 that passes
    every check of RFC 6455 section 4.2.1 that Tornado's path answers
    after the contract's (so those answers stay Tornado's), whose ``Host``
    Tornado accepts, which announces no body, and whose ``token`` argument
    is UTF-8. Anything else would get from Tornado an answer of its own
    (404, a plain 400 or 426 on a connection kept open), so it goes there.
    """
    if head.method != "GET" or head.path != PATH or head.version != "HTTP/1.1":
        raise NotNative("not a GET /ws over HTTP/1.1")
    headers = head.headers
    if "content-length" in headers or "transfer-encoding" in headers:
        raise NotNative("a body")
    host = headers.get("host")
    if not host or not _plain_host(host):
        raise NotNative("a Host Tornado reads its own way")
    if upgrade_problem(head.header, None) is not None:
        raise NotNative("not a complete WebSocket upgrade")
    return query_token(head.query)


def query_token(query: str) -> str | None:
    """The last ``token`` argument of ``query`` as Tornado's
    ``get_query_argument("token")`` reads it (percent-decoded as UTF-8,
    control characters as spaces, stripped); :class:`NotNative` when it is
    not UTF-8 (Tornado answers 400)."""
    if "token" not in query and "%" not in query:
        # No argument can be named token (a percent-encoded name, such as
        # %74oken, is decoded before it is compared): skip the parsing.
        return None
    values = urllib.parse.parse_qs(query, keep_blank_values=True, encoding="latin1",
                                   errors="strict").get("token")
    if not values:
        return None
    try:
        value = values[-1].encode("latin1").decode("utf-8")
    except UnicodeDecodeError:
        raise NotNative("a token argument that is not UTF-8") from None
    return value.translate(_CONTROL_TO_SPACE).strip()


#: A Host Tornado accepts as it is: a name, an IPv4 or bracketed IPv6
#: address, a port (its rule admits more punctuation; such hosts go to it).
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~[]:")


def _plain_host(host: str) -> bool:
    return all(c in _HOST_CHARS for c in host)


# --- after the 101 --------------------------------------------------------------------


class Accepting(Transport, Protocol):
    """The connection after the 101, as :func:`open_session` accepts or refuses it."""

    receiver: Receiver | None
    on_gone: Callable[[int, str], None] | None


async def open_session(services: Services, connection: Accepting, upgraded: Upgraded) -> Session:
    """Run the connection's :class:`Session` before anything it sent is read.

    Accepted, ``connection`` gets the session as its receiver; refused (4001,
    4008), none, and the session hears of the end through ``on_gone``.
    """
    admitted = upgraded.admitted
    session = Session(services, connection, upgraded.address, upgraded.limit_key)
    services.registry.transfer(admitted.reservation, session)
    if await session.open(admitted.credentials, admitted.verdict):
        # Frames are parsed only once a receiver is set: those pipelined
        # behind a refused token are dropped unread.
        connection.receiver = session
    else:
        connection.on_gone = lambda code, reason: session.on_closed(code, reason, False)
    return session
