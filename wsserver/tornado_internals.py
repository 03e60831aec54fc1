"""Every reach into Tornado's private attributes, in one place.

Tornado has no public accessor for these; each use is pinned by ``tornado<7``
in ``setup.cfg`` and covered by tests that fail if an upgrade moves them.
``wsserver.listener`` keeps its own two (``TCPServer._sockets``/``_handlers``),
next to the accept loop they replace.
"""

from __future__ import annotations

from typing import Any

import tornado.websocket
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPServerRequest
from tornado.iostream import IOStream


class ServerProtocol13(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol, remembering the close code the server itself sent.

    Tornado closes on its own for oversized messages (1009), and the handler
    only learns the peer's code, so the logs and the ``closes_total`` metric
    would otherwise show 1006 for those.
    """

    sent_close: tuple[int, str] | None = None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        # An echo of the client's close frame is not the server's decision.
        if self.sent_close is None and not self.server_terminated and not self.client_terminated:
            self.sent_close = (code or 1000, reason or "")
        super().close(code, reason)


def websocket_params(handler: tornado.websocket.WebSocketHandler) -> Any:
    """The ``_WebSocketParams`` Tornado builds in ``get_websocket_protocol``."""
    return tornado.websocket._WebSocketParams(
        ping_interval=handler.ping_interval,
        ping_timeout=handler.ping_timeout,
        max_message_size=handler.max_message_size,
        compression_options=handler.get_compression_options(),
    )


def pending_bytes(stream: IOStream) -> int:
    """Bytes written to ``stream`` that the kernel has not taken yet."""
    return len(stream._write_buffer)


def disconnect_after_response(request: HTTPServerRequest) -> None:
    """Close the HTTP connection once the response to ``request`` is sent.

    Tornado then also answers ``Connection: close``, and reads no request
    pipelined behind this one. Tornado decides this only from the request's
    own headers (``HTTP1Connection._disconnect_on_finish``); there is no
    public switch.
    """
    connection = request.connection
    if isinstance(connection, HTTP1Connection):
        connection._disconnect_on_finish = True
