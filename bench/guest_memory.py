"""Warming this machine's memory before a measured pull, so that a baseline and the run it is
compared with meet memory in the same state.

This VM backs guest memory lazily: the first time a page is touched the host has to supply it,
and the guest process that touched it pays (measured here: writing 2 GiB of new page cache cost
2.5-5.6 CPU-s, the same write into pages just freed 0.4 CPU-s). A pull writes every byte of an
image twice (containerd's content store and its snapshot; a lease holder spools it once more),
so whichever pull happens to grow the page cache into untouched memory looks several times more
costly, whatever it does. Touching and freeing enough memory right before each measured pull
gives its writes pages the host already backs, as on a machine whose memory is its own.
"""

from __future__ import annotations

import time

GIB = 1024**3
# Touched in pieces so no single allocation is huge; all held at once so the pages differ.
PIECE = 64 * 1024 * 1024


def touch(gib: float) -> float:
    """Write to `gib` GiB of new memory, free it, and return the seconds it took."""
    start = time.monotonic()
    pieces = [b"\x01" * PIECE for _ in range(max(1, round(gib * GIB / PIECE)))]
    del pieces
    return time.monotonic() - start
