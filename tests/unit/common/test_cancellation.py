"""Bounded cancel-and-wait: a stop goes on past a task ignoring its cancel; errors are consumed."""

from __future__ import annotations

import asyncio
import gc

from services.common.cancellation import cancel_and_wait


async def test_cancelled_tasks_end_and_none_is_left() -> None:
    # Tasks that would run for an hour (only the cancel ends them) and one that ends at once.
    tasks = [asyncio.create_task(asyncio.sleep(3600)) for _ in range(3)]
    finished = asyncio.create_task(asyncio.sleep(0))
    await finished
    stuck = await cancel_and_wait([*tasks, finished], within=30.0, owner="test")
    assert stuck == []
    assert all(task.cancelled() for task in tasks)
    assert finished.done() and not finished.cancelled()


async def test_a_task_ignoring_its_cancel_is_returned_instead_of_waited_for() -> None:
    release = asyncio.Event()
    ignored = 0

    async def stubborn() -> None:
        nonlocal ignored
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                ignored += 1

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)  # one loop turn: the task reaches its wait (a yield, not a wait)
    try:
        stuck = await cancel_and_wait([task], within=0.2, owner="test")
        assert stuck == [task]
        assert ignored == 1
        assert not task.done()
    finally:
        release.set()
        await task


async def test_failures_of_the_tasks_are_retrieved() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)  # one loop turn: the task runs and fails (a yield, not a wait)
    assert task.done()
    assert await cancel_and_wait([task], within=1.0, owner="test") == []
    del task
    gc.collect()
    loop.set_exception_handler(None)
    assert reported == []
