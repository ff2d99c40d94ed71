"""AsyncClosing: ``async with`` gives the resource and closes it on the way out, whether its
close() is a coroutine or a plain method, and also when the block raises."""

from __future__ import annotations

import pytest

from services.common.closing import AsyncClosing


class _AsyncResource(AsyncClosing):
    def __init__(self) -> None:
        self.closed = 0

    async def close(self) -> None:
        self.closed += 1


class _SyncResource(AsyncClosing):
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("kind", [_AsyncResource, _SyncResource])
async def test_leaving_the_block_closes_the_resource_once(
    kind: type[_AsyncResource | _SyncResource],
) -> None:
    resource = kind()
    async with resource as entered:
        assert entered is resource
        assert resource.closed == 0
    assert resource.closed == 1


@pytest.mark.parametrize("kind", [_AsyncResource, _SyncResource])
async def test_an_error_in_the_block_closes_the_resource_and_propagates(
    kind: type[_AsyncResource | _SyncResource],
) -> None:
    resource = kind()
    with pytest.raises(KeyError):
        async with resource:
            raise KeyError("boom")
    assert resource.closed == 1
