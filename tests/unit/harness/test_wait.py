"""The wait helpers: a condition that comes true ends the wait; one that never does fails it
naming what was awaited; a dependency that is gone ends it early."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.harness.wait import WaitAborted, eventually, wait_for, wait_until


def test_eventually_reports_whether_the_condition_held() -> None:
    calls = iter([False, False, True])
    assert eventually(lambda: next(calls), timeout=5.0, interval=0.001)
    assert not eventually(lambda: False, timeout=0.05, interval=0.01)


def test_wait_for_names_what_did_not_happen_and_explains_it() -> None:
    with pytest.raises(TimeoutError, match=r"^the flag raised not within 0.05 s: last: down$"):
        wait_for("the flag raised", lambda: False, 0.05, 0.01, detail=lambda: "last: down")


def test_a_process_exiting_ends_the_wait_at_once() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(timeout=30)

    def exited() -> str | None:
        return None if proc.poll() is None else f"exited with {proc.returncode}"

    started = time.monotonic()
    with pytest.raises(WaitAborted, match=r"^the server listening: exited with 3$"):
        wait_for("the server listening", lambda: False, 60.0, 0.01, gone=exited)
    # Ended by the exit, not by the 60 s bound.
    assert time.monotonic() - started < 30.0


def test_wait_for_returns_once_the_condition_holds() -> None:
    calls = iter([0, 0, 1])
    wait_for("the third call", lambda: next(calls), 5.0, 0.001)


async def test_wait_until_awaits_async_conditions_and_names_what_it_waited_for() -> None:
    calls = iter([False, True])

    async def check() -> bool:
        return next(calls)

    assert await wait_until(check, within=5.0, interval=0.001) >= 0.0
    with pytest.raises(TimeoutError, match=r"^the lease released not met within 0.05 s$"):
        await wait_until(lambda: False, 0.05, 0.01, what="the lease released")
