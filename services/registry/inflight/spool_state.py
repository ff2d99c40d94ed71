"""The pure bookkeeping of one growing spool: how far it is written, what a reader may take.

No I/O here, so every rule is tested directly: a reader never gets the blob's last byte before
the digest is verified (a wrong body is never completed), never reads past what was written,
and learns that a spool failed instead of waiting forever.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.errors import PeermirrorError


class SpoolPhase(enum.Enum):
    """Where a spool is in its life."""

    GROWING = "growing"
    COMPLETE = "complete"
    FAILED = "failed"


class SpoolFailedError(PeermirrorError):
    """The spool will never hold the blob (upstream failed, or the bytes did not verify)."""


@dataclass
class SpoolState:
    """How much of a `size`-byte blob is on disk and whether it is done."""

    digest: str
    size: int
    written: int = 0
    phase: SpoolPhase = SpoolPhase.GROWING
    error: str = ""

    def readable_end(self) -> int:
        """Offset up to which readers may read now: everything once verified, otherwise all
        written bytes except the blob's last one, which waits for the digest's verdict."""
        if self.phase is SpoolPhase.COMPLETE:
            return self.size
        return min(self.written, max(0, self.size - 1))

    def available(self, offset: int) -> int:
        """Bytes a reader at `offset` may take now (0: wait, or the end was reached)."""
        return max(0, self.readable_end() - offset)

    def check(self) -> None:
        """Raise SpoolFailedError when the spool failed."""
        if self.phase is SpoolPhase.FAILED:
            raise SpoolFailedError(f"spool of {self.digest} failed: {self.error}")

    def check_room(self, length: int) -> None:
        """ValueError unless `length` more bytes may be written (growing, within the size)."""
        if self.phase is not SpoolPhase.GROWING:
            raise ValueError(f"spool of {self.digest} is {self.phase.value}, not growing")
        if self.written + length > self.size:
            raise ValueError(f"upstream sent more than the {self.size} bytes of {self.digest}")

    def accept(self, length: int) -> None:
        """Record `length` more bytes as on disk (readers may take them from now on)."""
        self.check_room(length)
        self.written += length

    def complete(self) -> None:
        """All bytes written and verified."""
        self.phase = SpoolPhase.COMPLETE

    def fail(self, reason: str) -> None:
        """The spool will never be complete; readers are told `reason`."""
        if self.phase is SpoolPhase.GROWING:
            self.phase = SpoolPhase.FAILED
            self.error = reason

    @property
    def done(self) -> bool:
        return self.phase is not SpoolPhase.GROWING
