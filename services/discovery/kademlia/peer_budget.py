"""Per-peer token buckets bounding how many provider records a peer may store per second."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import ResourceExhaustedError


class RecordRateExceeded(ResourceExhaustedError):
    """A peer sent more records than its budget holds; nothing of the call was stored."""

    def __init__(self, rate: float, retry_after: float) -> None:
        super().__init__(f"over {rate:g} records per second; retry in {retry_after:.1f} s")
        self.rate = rate
        self.retry_after = retry_after


@dataclass(slots=True)
class _TokenBucket:
    tokens: float
    at: float


class PeerBudgets:
    """One token bucket per peer: `rate` records per second, up to `burst` at once (so a peer
    may publish its whole allowance when it joins, then refresh it at the sustained rate)."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._buckets: dict[bytes, _TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def spend(self, peer_id: bytes, amount: int, now: float) -> None:
        """Takes `amount` tokens from the peer's bucket; RecordRateExceeded (taking nothing)
        when it holds fewer."""
        bucket = self._buckets.get(peer_id)
        tokens = self.burst if bucket is None else self._level(bucket, now)
        if amount > tokens:
            # A call larger than the burst could never pass: say when a full bucket would.
            wanted = min(float(amount), self.burst)
            raise RecordRateExceeded(self.rate, max(wanted - tokens, 0.0) / self.rate)
        self._buckets[peer_id] = _TokenBucket(tokens - amount, now)

    def prune(self, now: float) -> int:
        """Forgets peers whose bucket is full again (they cost nothing to recreate)."""
        full = [pid for pid, b in self._buckets.items() if self._level(b, now) >= self.burst]
        for pid in full:
            del self._buckets[pid]
        return len(full)

    def _level(self, bucket: _TokenBucket, now: float) -> float:
        return min(self.burst, bucket.tokens + max(0.0, now - bucket.at) * self.rate)
