"""The one lifetime rule of the records nodes keep for each other: valid until `expires_at`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Expiring:
    """A record kept until `expires_at` (the caller's clock); `ttl` is what the wire carries."""

    expires_at: float

    def ttl(self, now: float) -> float:
        """Seconds left, as sent in peer.proto's TTL fields."""
        return max(0.0, self.expires_at - now)
