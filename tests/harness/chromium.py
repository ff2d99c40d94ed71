"""Runs headless Chromium (Debian `chromium`) against loopback pages: DOM dumps and screenshots.

Every run gets a fresh profile directory and its own process group; whatever happens, the group
is killed and the profile removed afterwards, so no browser process outlives a test or script.
Background networking, updates, sync and QUIC are off: the browser only talks to the URL given.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence

# Generous: the first start on two busy cores builds the profile and font caches.
RUN_TIMEOUT = 90.0

_FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


class ChromiumError(Exception):
    """Chromium is missing, failed, or did not finish in time."""


def chromium_binary() -> str | None:
    """Path of the Chromium executable, None when not installed."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_chromium(args: Sequence[str], limit: float = RUN_TIMEOUT) -> bytes:
    """Run Chromium with our flags plus `args` for at most `limit` seconds; returns stdout."""
    binary = chromium_binary()
    if binary is None:
        raise ChromiumError("chromium is not installed (Debian package `chromium`)")
    profile = tempfile.mkdtemp(prefix="pm-chromium-")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = await asyncio.create_subprocess_exec(
        binary,
        *_FLAGS,
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    try:
        try:
            async with asyncio.timeout(limit):
                out, err = await proc.communicate()
        except TimeoutError:
            raise ChromiumError(f"chromium did not finish within {limit:g}s") from None
        if proc.returncode != 0:
            tail = err.decode(errors="replace")[-2000:]
            raise ChromiumError(f"chromium exited with {proc.returncode}: {tail}")
        return out
    finally:
        # Renderer, GPU and zygote helpers share the group; none may outlive the run.
        _kill_group(proc.pid)
        if proc.returncode is None:
            await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def dump_dom(url: str) -> str:
    """The DOM of `url` after it loaded, serialised as HTML."""
    return (await run_chromium(["--dump-dom", url])).decode("utf-8", errors="replace")


async def screenshot(url: str, path: str, width: int = 1200, height: int = 900) -> None:
    """A PNG of `url` at `width`x`height` written to `path`."""
    await run_chromium([f"--screenshot={path}", f"--window-size={width},{height}", url])
