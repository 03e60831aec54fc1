"""Requests Tornado cannot parse: one short, redacted line each, throttled per address.

Tornado logs such a request with its parser's message, which quotes the
client's text: after one bare CR in the headers, that is every header that
follows, bearer tokens and API keys included, about 15 kB per request and no
limit per client. :class:`MalformedRequestLog`, a filter on Tornado's
``tornado.general`` logger, drops that line and writes instead the request
line (query tokens redacted, escaped, cut) and the reason without the text it
quotes, at most :class:`~wsserver.logthrottle.LogThrottle`'s burst per address
and minute, as for refused handshakes. Every one is counted in
``wsserver_rejections_total{reason="malformed_request"}``. Tornado's answer,
a bare 400 and a closed connection, is unchanged.
"""

from __future__ import annotations

import logging

from tornado.httputil import HTTPInputError

from wsserver.edge.tornado_internals import MALFORMED_MESSAGE, malformed_request_line
from wsserver.logsafe import error_reason, escape, redact_request_line
from wsserver.netaddr import limit_key
from wsserver.services import Services

log = logging.getLogger("wsserver.connection")

#: The logger Tornado writes the line on (``tornado.log.gen_log``).
TORNADO_LOGGER = "tornado.general"


class MalformedRequestLog(logging.Filter):
    """Replaces Tornado's "Malformed HTTP message" lines while installed."""

    def __init__(self, services: Services) -> None:
        super().__init__()
        self._services = services

    def install(self) -> None:
        logging.getLogger(TORNADO_LOGGER).addFilter(self)

    def remove(self) -> None:
        logging.getLogger(TORNADO_LOGGER).removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for Tornado's line, after logging ours; True for any other."""
        args = record.args
        if record.msg != MALFORMED_MESSAGE or not isinstance(args, tuple) or len(args) != 2:
            return True
        context, error = args
        services = self._services
        services.metrics.rejections.labels("malformed_request").inc()
        # The peer's address: the headers that would name a proxied client are the
        # very thing that could not be parsed.
        address = str(getattr(context, "remote_ip", None) or context)
        key = limit_key(address)
        logged, earlier = services.malformed_log.allow(key)
        if earlier:
            log.info("%d more malformed requests from %s suppressed", earlier, escape(key))
        if logged:
            line = malformed_request_line(error) if isinstance(error, HTTPInputError) else None
            log.info(
                "malformed request refused (400): %s; addr=%s request=%s",
                escape(error_reason(str(error))), escape(address),
                escape(redact_request_line(line)) if line else "-",
            )
        return False
