"""Reads a byte range of an open file in chunks, off the event loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Callable


async def read_range(
    fd: int, start: int, end: int, chunk_bytes: int, shrank: Callable[[], BaseException]
) -> AsyncGenerator[bytes, None]:
    """Bytes `start` to `end` of the file open as `fd`, `chunk_bytes` at a time, each read on a
    worker thread; `shrank()` is raised when the file ends first. `fd` is this generator's once
    iteration has begun: it is closed when the generator is (close it, e.g. with
    ``contextlib.aclosing``, when stopping early). Iterate at once after creating it: a
    generator closed before its first step never runs its cleanup."""
    try:
        position = start
        while position < end:
            chunk = await asyncio.to_thread(
                os.pread, fd, min(chunk_bytes, end - position), position
            )
            if not chunk:
                raise shrank()
            position += len(chunk)
            yield chunk
    finally:
        os.close(fd)
