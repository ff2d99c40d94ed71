"""Keeping this machine's memory in one state for a measured pull, so that a baseline and the
run it is compared with meet memory alike.

This VM backs guest memory lazily: the first time a page is touched the host has to supply it,
and the guest process that touched it pays (measured here: writing 2 GiB of new page cache cost
2.5-5.6 CPU-s, the same write into pages just freed 0.4 CPU-s). A pull writes every byte of an
image twice (containerd's content store and its snapshot; a lease holder spools it once more),
so whichever pull happens to grow the page cache into untouched memory looks several times more
costly, whatever it does. Two things give a measured pull's writes pages the host already
backs, as on a machine whose memory is its own:

- :func:`touch`: touching and freeing enough memory right before each measured pull;
- :func:`freed_pages_kept`: this VM's kernel hands every freed page back to the host at once
  (free page reporting, ``min_free_ms`` 0), so a touch's pages were mostly gone again by the
  time a pull of several seconds reached them. perf showed it: in a wave of first pulls, each
  containerd spent 248 of its 1,393 samples copying into new page cache
  (``copy_folio_from_iter_atomic``) against 34 for the same writes of the lone pull, all else
  alike. Held off for the run, wave and lone containerd spent the same per GB (5.95 and 6.28
  CPU-s).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

GIB = 1024**3
# Touched in pieces so no single allocation is huge; all held at once so the pages differ.
PIECE = 64 * 1024 * 1024
# What a touch leaves to everything else at the least (a smaller machine touches less).
SPARE = 2 * GIB


# The knobs of this VM kernel's free page reporting (absent on other kernels).
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")
# How long a freed page waits before it is handed back to the host: longer than a benchmark
# run (this kernel refuses 600 s).
HOLD_MS = 300_000


def _meminfo_kib(field: str) -> int:
    """One field of /proc/meminfo, in KiB."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise OSError(f"/proc/meminfo has no {field} line")


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    return _meminfo_kib("MemAvailable") * 1024


def touch(gib: float) -> tuple[float, float]:
    """Write to `gib` GiB of new memory (less when the machine cannot spare it) and free it;
    returns the GiB touched and the seconds it took."""
    start = time.monotonic()
    count = round(min(gib * GIB, max(0, available_bytes() - SPARE)) / PIECE)
    pieces = [b"\x01" * PIECE for _ in range(count)]
    del pieces
    return count * PIECE / GIB, time.monotonic() - start


def memory_total_mib() -> int:
    """MemTotal from /proc/meminfo, in MiB."""
    return _meminfo_kib("MemTotal") // 1024


def hold_settings(total_mib: int) -> dict[str, str]:
    """The reporting settings that keep freed pages the guest's for :data:`HOLD_MS`: each waits
    that long, and all of memory may wait at once."""
    return {"min_free_ms": str(HOLD_MS), "max_waiting_mib": str(total_mib)}


@contextlib.contextmanager
def freed_pages_kept(knobs: Path = PAGE_REPORTING) -> Iterator[str]:
    """While inside, pages the guest frees stay its own for minutes instead of going back to the
    host at once; the settings found are restored on the way out. Yields a line saying what was
    done (nothing where the kernel has no such knobs or they cannot be written)."""
    wanted = hold_settings(memory_total_mib())
    try:
        saved = {name: (knobs / name).read_text().strip() for name in wanted}
    except OSError:
        yield "free page reporting: no knobs on this kernel, left as it is"
        return
    changed: dict[str, str] = {}
    note = (
        "free page reporting held off for the run ("
        + ", ".join(f"{name} {saved[name]} -> {wanted[name]}" for name in wanted)
        + ", restored after)"
    )
    try:
        for name, value in wanted.items():
            (knobs / name).write_text(value)
            changed[name] = saved[name]
    except OSError as exc:
        note = f"free page reporting: left as it is ({exc})"
    try:
        yield note
    finally:
        for name, value in changed.items():
            with contextlib.suppress(OSError):
                (knobs / name).write_text(value)
