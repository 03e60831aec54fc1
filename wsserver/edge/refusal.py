"""One place where a refused handshake becomes its HTTP answer (``/ws`` and ``/sse``)."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import tornado.web

from wsserver.edge.tornado_internals import disconnect_after_response
from wsserver.errors import BackendRefused, Rejection
from wsserver.logsafe import escape
from wsserver.services import Services

log = logging.getLogger("wsserver.connection")


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

    Every refusal is counted; only the first few per address and interval
    are logged (:class:`~wsserver.logthrottle.LogThrottle`), then one line
    says how many more were suppressed. The handler's access log line is
    silenced (``quiet_access_log``): the line here stands for it.
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
    handler.quiet_access_log = True  # type: ignore[attr-defined]
    disconnect_after_response(handler.request)
    handler.set_status(rejection.status)
    if rejection.retry_after is not None:
        handler.set_header("Retry-After", str(max(1, math.ceil(rejection.retry_after))))
    handler.set_header("Content-Type", "application/json")
    handler.set_header("Cache-Control", "no-store")
    body: dict[str, Any] = {"error": rejection.reason, "message": rejection.message}
    if isinstance(rejection, BackendRefused):
        body["code"] = rejection.code  # the backend's close code (4000-4999)
    handler.finish(json.dumps(body))
