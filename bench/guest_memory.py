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
# What a touch leaves to everything else at the least (a smaller machine touches less).
SPARE = 2 * GIB


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


def touch(gib: float) -> tuple[float, float]:
    """Write to `gib` GiB of new memory (less when the machine cannot spare it) and free it;
    returns the GiB touched and the seconds it took."""
    start = time.monotonic()
    count = round(min(gib * GIB, max(0, available_bytes() - SPARE)) / PIECE)
    pieces = [b"\x01" * PIECE for _ in range(count)]
    del pieces
    return count * PIECE / GIB, time.monotonic() - start
