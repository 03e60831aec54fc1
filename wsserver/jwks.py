"""Token keys from a JSON Web Key Set URL (``--jwt-jwks-url``), by ``kid``.

An identity provider (Keycloak, Auth0, Okta, Azure AD) publishes its public
keys at a URL and rotates them: a new key appears in the set before tokens
are signed with it, an old one disappears after its tokens have expired.
:class:`KeySet` keeps the last good set and refetches it:

* when a token names a ``kid`` the set does not hold (a rotation), but **at
  most once per ``--jwks-refresh-min`` seconds**, whatever the tokens say:
  random ``kid``s from an attacker cost one fetch per interval, not one each;
  every caller waiting meanwhile shares the one fetch in flight;
* in the background, when the set is older than :data:`MAX_AGE` (so a key
  the provider withdrew stops being accepted), or while no set was ever
  fetched.

A fetch that fails (unreachable, not 200, not a key set, no usable key)
changes nothing: the last good keys stay in use, and ``/readyz`` stays 200
as long as there are some. Nothing here blocks the event loop: the fetch
goes through the edge's asynchronous HTTP client, and PyJWT only parses the
fetched document (``PyJWK``), it never fetches (``PyJWKClient`` would, with
urllib, synchronously).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from jwt import PyJWK
from jwt.exceptions import PyJWKError, PyJWTError

from wsserver.metrics import Metrics
from wsserver.outbound import HttpClient, HttpFailure, display_url

log = logging.getLogger("wsserver.jwks")

#: Seconds a fetched set is used before it is fetched again in the background.
MAX_AGE = 300.0
#: Seconds one fetch may take.
FETCH_TIMEOUT = 5.0


class KeySet:
    """The signing keys of one JWKS URL: a cache with a rate-limited refetch.

    Args:
        url: the key set's URL.
        http: the shared HTTP client (the edge's).
        metrics: ``wsserver_jwks_fetches_total{outcome}`` and ``wsserver_jwks_keys``.
        algorithms: the accepted algorithms; a key whose algorithm is not one
            of them is left out (it could never verify an accepted token).
        refresh_min: seconds at least between two fetches.
    """

    def __init__(
        self,
        url: str,
        http: HttpClient,
        metrics: Metrics,
        *,
        algorithms: Iterable[str],
        refresh_min: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._http = http
        self._metrics = metrics
        self.algorithms = frozenset(algorithms)
        self.refresh_min = refresh_min
        self._clock = clock
        #: kid → (the key, its algorithm).
        self._keys: dict[str, tuple[Any, str]] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._fetch: asyncio.Future[bool] | None = None
        self.fetches = 0

    # --- reading ---------------------------------------------------------------

    def get(self, kid: str) -> tuple[Any, str] | None:
        """The key named ``kid`` and its algorithm, or None."""
        return self._keys.get(kid)

    @property
    def ready(self) -> bool:
        """True once a key set has been fetched (and kept since)."""
        return bool(self._keys)

    @property
    def kids(self) -> list[str]:
        """The ``kid`` of every key held, sorted."""
        return sorted(self._keys)

    def may_fetch(self) -> bool:
        """True when a fetch is allowed now (none in flight, the interval passed)."""
        if self._fetch is not None and not self._fetch.done():
            return False
        return self._last_attempt is None or (
            self._clock() - self._last_attempt >= self.refresh_min
        )

    # --- fetching --------------------------------------------------------------

    async def refresh(self) -> bool:
        """Fetch the set again if allowed, or share the fetch in flight.

        Returns:
            True when a fetch ran (or was in flight) and succeeded; False when
            none was allowed or it failed (the keys held are unchanged).
        """
        fetch = self._fetch
        if fetch is None or fetch.done():
            if not self.may_fetch():
                return False
            fetch = self._start()
        # Shielded: a handshake that gives up must not cancel everyone's fetch.
        return await asyncio.shield(fetch)

    def refresh_soon(self) -> None:
        """Start a fetch in the background if one is allowed (from synchronous code)."""
        if self.may_fetch():
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to do
                self._start()

    def refresh_if_stale(self) -> None:
        """The periodic check: fetch when no set is held, or the held one is old."""
        if self._fetched_at is None or self._clock() - self._fetched_at >= MAX_AGE:
            self.refresh_soon()

    def _start(self) -> asyncio.Future[bool]:
        self._last_attempt = self._clock()
        fetch = self._fetch = asyncio.ensure_future(self._fetch_once())
        return fetch

    async def _fetch_once(self) -> bool:
        self.fetches += 1
        try:
            answer = await asyncio.wait_for(self._http.get(self.url, FETCH_TIMEOUT),
                                            FETCH_TIMEOUT)
            if answer.status != 200:
                raise HttpFailure(f"HTTP {answer.status}")
        except (HttpFailure, TimeoutError) as exc:
            self._failed("error", str(exc) or f"no answer within {FETCH_TIMEOUT:g} s")
            return False
        try:
            count = self.load(answer.body)
        except ValueError as exc:
            self._failed("invalid", str(exc))
            return False
        self._metrics.jwks_fetches.labels("ok").inc()
        log.info("JWKS %s: %d signing key(s): %s", display_url(self.url), count,
                 ", ".join(self.kids))
        return True

    def _failed(self, outcome: str, detail: str) -> None:
        self._metrics.jwks_fetches.labels(outcome).inc()
        held = (f"keeping the {len(self._keys)} key(s) held" if self._keys
                else "no keys yet: tokens cannot be verified")
        log.warning("JWKS %s: fetch failed: %s; %s", display_url(self.url), detail, held)

    def load(self, document: bytes) -> int:
        """Replace the held keys with the signing keys in ``document``; their count.

        Raises:
            ValueError: not a key set, or no usable signing key in it (nothing changes).
        """
        try:
            data = json.loads(document)
        except (ValueError, RecursionError):
            raise ValueError("the answer is not JSON") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError("the answer is not a JWK Set (no 'keys' list)")
        keys: dict[str, tuple[Any, str]] = {}
        for entry in entries:
            parsed = self._signing_key(entry)
            if parsed is not None:
                kid, key, algorithm = parsed
                keys[kid] = (key, algorithm)
        if not keys:
            raise ValueError(
                f"no usable signing key (with a 'kid', for {', '.join(sorted(self.algorithms))})"
            )
        self._keys = keys
        self._fetched_at = self._clock()
        self._metrics.jwks_keys.set(len(keys))
        return len(keys)

    def _signing_key(self, entry: object) -> tuple[str, Any, str] | None:
        """``(kid, key, algorithm)`` for a usable signing key, else None (skipped)."""
        if not isinstance(entry, dict):
            return None
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or entry.get("use", "sig") != "sig":
            return None
        try:
            jwk = PyJWK(entry)
        except (PyJWKError, PyJWTError, ValueError, TypeError):
            return None
        if jwk.algorithm_name not in self.algorithms:
            return None
        return kid, jwk.key, jwk.algorithm_name

    async def close(self) -> None:
        """Cancel a fetch in flight (at shutdown)."""
        if self._fetch is not None and not self._fetch.done():
            self._fetch.cancel()
            with contextlib.suppress(BaseException):
                await self._fetch
