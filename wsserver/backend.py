"""The application's backend decides: the connect, subscribe, publish and rpc proxies.

The server POSTs JSON to the URLs the operator configured and reads the
answers (docs/backend.md); the request and answer shapes
are in docs/backend.md. What this module guarantees, whatever the backend
does:

* **Bounded time.** Every call gives up after ``--proxy-timeout`` seconds.
* **Bounded concurrency, no queue.** At most ``--proxy-max-concurrency``
  calls of one kind are in flight; one more is refused at once (outcome
  ``overloaded``), so a dead backend cannot pile up waiting handshakes or
  messages, and the other kinds keep their own share.
* **One answer per failure.** A refused call, a 500, garbage or a timeout
  becomes a typed error: :class:`~wsserver.errors.BackendRefused` /
  :class:`~wsserver.errors.BackendUnavailable` (HTTP 403 / 503 before the
  upgrade) for a connect, :class:`~wsserver.errors.BackendError` /
  :class:`~wsserver.errors.Unavailable` for a message.
* **Nothing sent is logged.** Log lines name the kind, the URL (without
  credentials or query) and what went wrong; never a header, a cookie or a
  body.

Counted in ``wsserver_proxy_requests_total{kind, outcome}`` with outcomes
``ok``, ``refused``, ``error`` (no answer, or not 200), ``timeout``,
``invalid`` (an answer that is not what the contract says) and
``overloaded``; latency in ``wsserver_proxy_request_seconds{kind}``.

Pure asyncio over :class:`~wsserver.outbound.HttpClient`; no Tornado.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from wsserver import protocol
from wsserver.auth import Identity, user_problem
from wsserver.config import Secret
from wsserver.errors import (
    BackendError,
    BackendRefused,
    BackendUnavailable,
    TokenInvalid,
    Unavailable,
)
from wsserver.logsafe import escape
from wsserver.logthrottle import LogThrottle
from wsserver.metrics import Metrics
from wsserver.outbound import HttpClient, HttpFailure, display_url
from wsserver.rooms import Grants

log = logging.getLogger("wsserver.backend")

Kind = Literal["connect", "subscribe", "publish", "rpc"]
KINDS: tuple[Kind, ...] = ("connect", "subscribe", "publish", "rpc")
#: The header that tells the backend the call comes from this server.
PROXY_KEY_HEADER = "X-Wsserver-Proxy-Key"
#: Seconds a client is told to wait after ``unavailable`` / 503.
RETRY_AFTER = 2.0
#: A backend's error code is passed to the client when it looks like ours.
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_ERROR_MESSAGE = 256
#: RFC 6455 section 5.5: a close frame's reason fits in 123 bytes.
MAX_REASON_BYTES = 123


class _Failed(Exception):
    """A call that got no usable answer; ``outcome`` is its metric label."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


class Backend:
    """The proxies of one server: one per configured URL, sharing one HTTP client.

    Args:
        urls: the configured proxies, by kind (``Settings.proxy_urls``).
        http: the shared HTTP client (the edge's).
        metrics: where calls are counted and timed.
        key: sent as ``X-Wsserver-Proxy-Key`` on every call, when set.
        timeout: seconds before a call is given up.
        max_concurrency: calls of one kind in flight at once.
        header_names: the handshake headers a connect call carries.
    """

    def __init__(
        self,
        urls: Mapping[str, str],
        http: HttpClient,
        metrics: Metrics,
        *,
        key: Secret | None = None,
        timeout: float = 3.0,
        max_concurrency: int = 64,
        header_names: tuple[str, ...] = ("Cookie", "Authorization"),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.urls = dict(urls)
        self._http = http
        self._metrics = metrics
        self._headers = {"Content-Type": "application/json"}
        if key is not None:
            self._headers[PROXY_KEY_HEADER] = key.reveal()
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.header_names = header_names
        self._clock = clock
        self._wall = wall
        self._in_flight: dict[str, int] = dict.fromkeys(KINDS, 0)
        #: A dead backend fails every call: a few lines per kind and minute.
        self._log_throttle: LogThrottle[str] = LogThrottle(burst=5)

    def enabled(self, kind: Kind) -> bool:
        """True when the proxy of ``kind`` is configured."""
        return kind in self.urls

    def in_flight(self, kind: Kind) -> int:
        """Calls of ``kind`` waiting for the backend now."""
        return self._in_flight[kind]

    # --- the four proxies ------------------------------------------------------

    async def connect(
        self,
        transport: str,
        address: str,
        origin: str | None,
        header: Callable[[str], str | None],
    ) -> Identity:
        """Ask the backend who a connection without a JWT is.

        Args:
            transport: ``websocket`` (or ``sse``).
            address: the client's address, as the server sees it.
            origin: the ``Origin`` header, if any.
            header: the handshake's header lookup (case-insensitive); only the
                names in ``--proxy-headers`` are asked for and passed on.

        Raises:
            BackendRefused: the backend answered ``disconnect`` (HTTP 403).
            BackendUnavailable: no usable answer in time (HTTP 503).
        """
        headers = {name: value for name in self.header_names
                   if (value := header(name)) is not None}
        body = {"transport": transport, "addr": address, "origin": origin, "headers": headers}
        try:
            answer = await self._call("connect", body)
            identity = self._connect_answer(answer)
        except _Failed as failure:
            self._count("connect", failure.outcome)
            self._log_failure("connect", failure)
            raise BackendUnavailable(
                "the application's backend did not answer; retry later", retry_after=RETRY_AFTER
            ) from None
        except BackendRefused:
            self._count("connect", "refused")
            raise
        self._count("connect", "ok")
        return identity

    async def subscribe(self, user: str, room: str, data: Any = None) -> None:
        """Ask the backend whether ``user`` may join ``room``.

        Raises:
            BackendError: refused, with the backend's code (``forbidden`` by default).
            Unavailable: no usable answer in time.
        """
        body: dict[str, Any] = {"user": user, "room": room}
        if data is not None:
            body["data"] = data
        await self._decide("subscribe", body)

    async def publish(self, user: str, room: str, data: Any) -> Any:
        """Ask the backend whether ``user`` may publish ``data`` to ``room``.

        Returns:
            the data to publish: the backend's ``result.data`` when it gave
            one (moderation, enrichment), else ``data``.

        Raises:
            BackendError, Unavailable: as :meth:`subscribe`.
        """
        result = await self._decide("publish", {"user": user, "room": room, "data": data})
        return result.get("data", data)

    async def rpc(self, user: str, method: str, data: Any) -> Any:
        """Forward a client's rpc; the backend's ``result.data`` (None when absent).

        Raises:
            BackendError, Unavailable: as :meth:`subscribe`.
        """
        result = await self._decide("rpc", {"user": user, "method": method, "data": data})
        return result.get("data")

    # --- answers ---------------------------------------------------------------

    def _connect_answer(self, answer: dict[str, Any]) -> Identity:
        refusal = answer.get("disconnect")
        if isinstance(refusal, dict):
            code = refusal.get("code")
            if not (isinstance(code, int) and not isinstance(code, bool)
                    and 4000 <= code <= 4999):
                code = 4003
            reason = refusal.get("reason")
            if not isinstance(reason, str) or not reason:
                reason = "refused by the application"
            raise BackendRefused(_short_reason(reason), code)
        result = answer.get("result")
        if not isinstance(result, dict):
            raise _Failed("invalid", "the answer has neither 'result' nor 'disconnect'")
        user = result.get("user")
        problem = user_problem(user)
        if problem is not None:
            raise _Failed("invalid", f"result.user {problem}")
        assert isinstance(user, str)
        expires_at = result.get("expires_at")
        if expires_at is None:
            expires = math.inf  # the backend's session sets no end: none here either
        elif isinstance(expires_at, int | float) and not isinstance(expires_at, bool) \
                and math.isfinite(expires_at):
            expires = float(expires_at)
            if expires <= self._wall():
                raise BackendRefused("the application's session has expired", 4001)
        else:
            raise _Failed("invalid", "result.expires_at is not a number of Unix seconds")
        try:
            grants = Grants.from_claims(
                {claim: result[claim] for claim in ("rooms", "publish") if claim in result}
            )
        except TokenInvalid as exc:
            raise _Failed(
                "invalid", "result." + exc.reason.removeprefix("invalid token: ").strip("'")
            ) from None
        return Identity(user=user, expires_at=expires, grants=grants)

    async def _decide(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        """A subscribe, publish or rpc call: its ``result`` object, or the error it means."""
        try:
            answer = await self._call(kind, body)
            result = answer.get("result")
            error = answer.get("error")
            if isinstance(error, dict):
                self._count(kind, "refused")
                raise _backend_error(error)
            if not isinstance(result, dict):
                raise _Failed("invalid", "the answer has neither 'result' nor 'error'")
        except _Failed as failure:
            self._count(kind, failure.outcome)
            self._log_failure(kind, failure)
            raise Unavailable(
                "the application's backend did not answer; retry later", retry_after=RETRY_AFTER
            ) from None
        self._count(kind, "ok")
        return result

    # --- one call --------------------------------------------------------------

    async def _call(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the ``kind`` proxy; the answer's JSON object.

        Raises:
            _Failed: overloaded, no answer, not 200, timed out, not a JSON object.
        """
        url = self.urls.get(kind)
        if url is None:
            raise _Failed("error", "no URL configured")
        if self._in_flight[kind] >= self.max_concurrency:
            raise _Failed("overloaded", f"{self.max_concurrency} calls already in flight "
                                        "(--proxy-max-concurrency)")
        try:
            payload = protocol.encode(body)
        except (TypeError, ValueError):
            raise _Failed("invalid", "the request could not be encoded") from None
        self._in_flight[kind] += 1
        started = self._clock()
        try:
            answer = await asyncio.wait_for(
                self._http.post(url, payload, self._headers, self.timeout), self.timeout
            )
        except TimeoutError:
            raise _Failed("timeout", f"no answer within {self.timeout:g} s") from None
        except HttpFailure as exc:
            raise _Failed("error", str(exc)) from None
        finally:
            self._in_flight[kind] -= 1
            self._metrics.proxy_seconds.labels(kind).observe(self._clock() - started)
        if answer.status != 200:
            raise _Failed("error", f"HTTP {answer.status}")
        try:
            document = json.loads(answer.body)
        except (ValueError, RecursionError):
            raise _Failed("invalid", "the answer is not JSON") from None
        if not isinstance(document, dict):
            raise _Failed("invalid", "the answer is not a JSON object")
        return document

    def _count(self, kind: Kind, outcome: str) -> None:
        self._metrics.proxy_requests.labels(kind, outcome).inc()

    def _log_failure(self, kind: Kind, failure: _Failed) -> None:
        logged, earlier = self._log_throttle.allow(kind)
        if earlier:
            log.warning("%d more %s proxy failures suppressed", earlier, kind)
        if logged:
            log.warning("%s proxy %s: %s (%s); the client gets %s", kind,
                        display_url(self.urls.get(kind, "")), escape(failure.detail),
                        failure.outcome, "503" if kind == "connect" else "unavailable")


def _backend_error(error: Mapping[str, Any]) -> BackendError:
    """The client's error for a backend's ``{"error": {"code", "message"}}``."""
    code = error.get("code")
    if not isinstance(code, str) or _ERROR_CODE.fullmatch(code) is None:
        code = "forbidden"
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = "refused by the application"
    return BackendError(code, message[:MAX_ERROR_MESSAGE])


def _short_reason(reason: str) -> str:
    """``reason`` cut to fit a close frame (UTF-8, whole characters)."""
    encoded = reason.encode("utf-8")
    if len(encoded) <= MAX_REASON_BYTES:
        return reason
    return encoded[:MAX_REASON_BYTES].decode("utf-8", errors="ignore")
