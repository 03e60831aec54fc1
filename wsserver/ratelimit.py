"""Token buckets: a steady rate with room for bursts.

The clock is injected (a zero-argument callable returning seconds) so the
buckets can be tested without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Clock = Callable[[], float]
K = TypeVar("K", bound=Hashable)

#: Float refills drift by ~1e-13; a client that waits exactly ``retry_after``
#: must not be refused for that.
_EPSILON = 1e-9


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def _refill(self) -> float:
        now = self._clock()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._stamp = now
        return self._tokens

    def take(self, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens if there are enough.

        Returns:
            0.0 when allowed; otherwise the seconds until ``cost`` tokens
            will be there (nothing is spent).
        """
        tokens = self._refill()
        if tokens + _EPSILON >= cost:
            self._tokens = max(0.0, tokens - cost)
            return 0.0
        return (cost - tokens) / self.rate

    @property
    def full(self) -> bool:
        """True when the bucket has refilled to ``burst`` (it can be forgotten)."""
        return self._refill() + _EPSILON >= self.burst


class BucketTable(Generic[K]):
    """One :class:`TokenBucket` per key, created on first use.

    Memory stays bounded: :meth:`discard` forgets a key at once (a user whose
    last connection closed), :meth:`sweep` forgets every bucket that has
    refilled, since a full bucket behaves exactly like a new one.
    """

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[K, TokenBucket] = {}
        #: Keys whose bucket holds only a share of the rate (other nodes hold the rest).
        self._shares: dict[K, float] = {}

    def take(self, key: K, cost: float = 1.0) -> float:
        """Spend from ``key``'s bucket; 0.0 when allowed, else seconds to wait."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = self._new_bucket(key)
        return bucket.take(cost)

    def _new_bucket(self, key: K) -> TokenBucket:
        share = self._shares.get(key, 1.0)
        return TokenBucket(self.rate * share, max(1.0, self.burst * share), self._clock)

    def set_share(self, key: K, share: float) -> None:
        """Give ``key``'s bucket ``share`` (0 < share <= 1) of the rate and burst.

        Its tokens are capped to the new burst at once; the refill follows the
        new rate from now on.
        """
        share = min(1.0, max(share, 1e-6))
        if share >= 1.0:
            self._shares.pop(key, None)
        else:
            self._shares[key] = share
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.take(0.0)  # refill at the old rate up to now
            bucket.rate = self.rate * share
            bucket.burst = max(1.0, self.burst * share)
            bucket._tokens = min(bucket._tokens, bucket.burst)

    def discard(self, key: K) -> None:
        """Forget ``key``'s bucket, if it is full (a refilling one is kept)."""
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.full:
            del self._buckets[key]
            self._shares.pop(key, None)

    def sweep(self) -> int:
        """Forget every full bucket; returns how many were dropped."""
        full = [key for key, bucket in self._buckets.items() if bucket.full]
        for key in full:
            del self._buckets[key]
        return len(full)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets
