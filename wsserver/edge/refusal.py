"""One place where a refused handshake becomes its HTTP answer (``/ws`` and ``/sse``).

:func:`refusal` counts and logs the refusal and says what to answer;
:func:`refuse` answers it through a Tornado handler, and the native upgrade
path (:mod:`wsserver.edge.native`) writes :func:`response` itself: the same
status, headers and body either way.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import tornado.web

from wsserver.edge.tornado_internals import disconnect_after_response
from wsserver.errors import BackendRefused, Rejection
from wsserver.logsafe import escape
from wsserver.services import Services

log = logging.getLogger("wsserver.connection")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused handshake's HTTP answer (the connection is closed after it)."""

    status: int
    #: Besides ``Date``, ``Content-Length`` and ``Connection: close``.
    headers: tuple[tuple[str, str], ...]
    body: bytes


def refusal(
    services: Services, rejection: Rejection, *, limit_key: str, client_address: str
) -> Refusal:
    """Count and log a refused handshake, and say how to answer it.

    Every refusal is counted; only the first few per address and interval
    are logged (:class:`~wsserver.logthrottle.LogThrottle`), then one line
    says how many more were suppressed.
    """
    services.metrics.rejections.labels(rejection.reason).inc()
    logged, earlier = services.refusal_log.allow(limit_key)
    if earlier:
        log.info("%d more handshake refusals from %s suppressed", earlier, escape(limit_key))
    if logged:
        log.info(
            "handshake refused: %s (%d) addr=%s", escape(rejection.message),
            rejection.status, escape(client_address),
            extra={"status": rejection.status, "reason": rejection.reason},
        )
    headers: list[tuple[str, str]] = []
    if rejection.retry_after is not None:
        headers.append(("Retry-After", str(max(1, math.ceil(rejection.retry_after)))))
    headers += [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
    body: dict[str, Any] = {"error": rejection.reason, "message": rejection.message}
    if isinstance(rejection, BackendRefused):
        body["code"] = rejection.code  # the backend's close code (4000-4999)
    return Refusal(rejection.status, tuple(headers), json.dumps(body).encode())


def refuse(
    handler: tornado.web.RequestHandler,
    services: Services,
    rejection: Rejection,
    *,
    limit_key: str,
    client_address: str,
) -> None:
    """Answer a refused handshake with its HTTP status, then close the HTTP
    connection: handshakes pipelined behind it are never read, so one TCP
    connection gets at most one refusal.

    The handler's access log line is silenced (``quiet_access_log``): the
    refusal's own (throttled) line stands for it.
    """
    answer = refusal(services, rejection, limit_key=limit_key, client_address=client_address)
    handler.quiet_access_log = True  # type: ignore[attr-defined]
    disconnect_after_response(handler.request)
    handler.set_status(answer.status)
    for name, value in answer.headers:
        handler.set_header(name, value)
    handler.finish(answer.body)


def response(answer: Refusal) -> bytes:
    """The whole HTTP/1.1 response for ``answer``, as Tornado writes it for :func:`refuse`."""
    # In Tornado's order: its Content-Type and Date first, then those set.
    fields = dict(answer.headers)
    head = [f"HTTP/1.1 {answer.status} {http.client.responses.get(answer.status, 'Unknown')}",
            "Content-Type: " + fields.pop("Content-Type", "text/html; charset=UTF-8"),
            "Date: " + formatdate(usegmt=True)]
    head += [f"{name}: {value}" for name, value in fields.items()]
    head += [f"Content-Length: {len(answer.body)}", "Connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + answer.body
