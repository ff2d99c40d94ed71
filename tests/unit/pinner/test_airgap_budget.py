"""The import budget: refuses past its limit naming the config key, and yields as it goes."""

from __future__ import annotations

import asyncio

import pytest

from services.pinner.airgap.budget import DescriptorBudget, TooManyDescriptorsError
from services.pinner.airgap.layout import LayoutError


async def test_refuses_past_the_limit_naming_the_key() -> None:
    budget = DescriptorBudget(10)
    await budget.spend(10)
    with pytest.raises(TooManyDescriptorsError, match=r"pinner\.max_import_descriptors"):
        await budget.spend()
    # The manager reports LayoutErrors as a failed file, never as a crash.
    assert issubclass(TooManyDescriptorsError, LayoutError)


async def test_other_tasks_run_while_the_budget_is_spent() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)  # gives the loop back each tick: the ticks count turns

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # one loop turn: the ticker starts (a yield, not a wait)
    before = ticks
    budget = DescriptorBudget(100_000, yield_every=100)
    for _ in range(1_000):
        await budget.spend()
    task.cancel()
    # Ten yields: the other task ran in between, not only once the spending was over.
    assert ticks - before >= 10
