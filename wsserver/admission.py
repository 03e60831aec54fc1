"""The handshake's checks, in docs/protocol.md's order ("Connecting"), for every way in.

A WebSocket (``GET /ws``) and an HTTP stream (``GET /sse``) are admitted by
the same checks in the same order; only where the token comes from differs.
Each check raises its :class:`~wsserver.errors.Rejection` (an HTTP status
before the upgrade or the stream); a token that fails verification is not a
rejection but a *verdict*, answered after the upgrade (close 4001) or as the
stream's first event, so that it is counted in the registry's small
unverified pool.

==========================================  ===============================
check                                       failure
==========================================  ===============================
server draining                             503 + Retry-After
``Origin`` present and not allowed          403
handshake rate of the client address        429 + Retry-After
server at ``--max-connections``             503 + Retry-After
address at ``--max-connections-per-ip``     429
no token at all (and no connect proxy)      403
the connect proxy answers ``disconnect``    403 (its failure: 503)
==========================================  ===============================

Pure core: values in, an :class:`Admitted` or a raised rejection out (the
connect proxy and a key set's refetch are awaited through the services).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from wsserver.auth import Credentials, Identity, looks_like_jwt
from wsserver.errors import CloseError, Draining, HandshakeRateLimited, NoToken
from wsserver.registry import Reservation

if TYPE_CHECKING:
    from wsserver.services import Services

#: What a client should wait before retrying a draining server, in seconds.
DRAINING_RETRY_AFTER = 5.0


class Admitted(NamedTuple):
    """A handshake past every check: its credentials, their verdict, its registry slot.

    ``verdict`` is the verified identity (or the connect proxy's answer), or
    the :class:`CloseError` (4001) to answer once the connection is up.
    ``reservation`` holds the connection's place in the registry until the
    Session takes it (:meth:`~wsserver.registry.ConnectionRegistry.transfer`)
    or the handshake gives it back (:meth:`~wsserver.registry.ConnectionRegistry.release`).
    """

    credentials: Credentials
    verdict: Identity | CloseError
    reservation: Reservation


class Arrival(NamedTuple):
    """What the checks need to know of the request, whatever the way in."""

    #: The registry's and the buckets' key for the client address.
    address: str
    #: The client address as the connect proxy is told it.
    client_address: str
    origin: str | None
    #: The request's header lookup (case-insensitive), for the connect proxy.
    header: Callable[[str], str | None]
    #: ``websocket`` or ``sse``, as the connect proxy is told it.
    transport: str


def check_arrival(services: Services, arrival: Arrival) -> None:
    """The checks before any token is looked at.

    Raises:
        Draining: the server is shutting down (503).
        OriginRejected: the origin is present and not allowed (403).
        HandshakeRateLimited: the address is over its handshake rate (429).
    """
    if services.draining:
        raise Draining("server shutting down", retry_after=DRAINING_RETRY_AFTER)
    services.origins.check(arrival.origin)
    wait = services.handshake_buckets.take(arrival.address)
    if wait:
        raise HandshakeRateLimited("too many handshakes from this address", retry_after=wait)


async def admit(
    services: Services,
    arrival: Arrival,
    credentials: Credentials | None,
    *,
    no_token: str,
    verdict: Identity | CloseError | None = None,
) -> Admitted:
    """The checks after the token was found: the caps, then "no token" (or the
    connect proxy, for a connection without a JWT when one is configured).

    The token is verified here (unless ``verdict`` is given: a ticket that was
    not found is one), before the caps, so that a bad one is counted against
    the unverified pool and never crowds verified users out of
    ``--max-connections``. The registry slot is reserved in the same step as
    the check, so concurrent handshakes cannot all pass the cap; while the
    connect proxy answers, the slot is held, and given back if it refuses.

    Args:
        no_token: the message of the 403 when there is no token (says how
            this way in takes one).

    Raises:
        ServerFull: the server (or the unverified pool) is full (503).
        TooManyFromAddress: the address is at its cap (429).
        NoToken: no token, and no connect proxy (403).
        BackendRefused, BackendUnavailable: the connect proxy's 403 or 503.
    """
    backend = services.backend
    proxied = backend is not None and backend.enabled("connect")
    if (proxied and credentials is not None and credentials.source == "header"
            and not looks_like_jwt(credentials.token)):
        credentials = None  # the application's own bearer: the backend reads it
    if credentials is not None and verdict is None:
        try:
            verdict = await services.verifier.verify_fresh(credentials.token)
        except CloseError as error:
            verdict = error
    verified = not isinstance(verdict, CloseError)
    registry = services.registry
    registry.check_admission(arrival.address, verified=verified)
    if credentials is None and proxied:
        assert backend is not None
        # Counted before the call, in the same callback as the check.
        reservation = registry.reserve(arrival.address, True)
        try:
            identity = await backend.connect(arrival.transport, arrival.client_address,
                                             arrival.origin, arrival.header)
        except BaseException:
            registry.release(reservation)
            raise
        return Admitted(Credentials("", "proxy"), identity, reservation)
    if credentials is None or verdict is None:
        raise NoToken(no_token)
    return Admitted(credentials, verdict, registry.reserve(arrival.address, verified))
