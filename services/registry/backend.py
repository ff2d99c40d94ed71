"""Keeps the registry's content store open and watched, whatever the store daemon does.

The store is opened in the background with retries, so the registry starts (and answers 404,
letting containerd fall back) while containerd is still coming up. A watch on the store keeps the
content cache honest; the cache is switched on only while a watch is live.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field

from services.common.config import NodeConfig
from services.common.logsetup import get_logger
from services.common.store.protocol import ContentStore
from services.registry.cache import ContentCache

# Time given to a fresh subscription before caching relies on it: containerd gives no sign of
# when a subscription is in force.
WATCH_SETTLE_S = 0.5
RETRY_S = 1.0

log = get_logger(__name__)

StoreOpener = Callable[[], Awaitable[ContentStore]]


async def open_store(cfg: NodeConfig) -> ContentStore:
    """Open the content store `cfg.store` names (containerd or an OCI layout directory)."""
    if cfg.store.backend == "oci-layout":
        from services.common.store.oci_layout import OciLayoutStore

        return OciLayoutStore(cfg.store.oci_layout_path, create=True)
    from services.common.store.containerd_store import ContainerdStore

    return await ContainerdStore.open(
        cfg.store.containerd_address,
        cfg.store.containerd_namespace,
        cfg.store.content_root,
    )


@dataclass(eq=False)
class StoreKeeper:
    """The current store (None until opened) and the watch task that maintains `cache`.

    Give exactly one of `opener` (the keeper opens the store, retrying, and closes it) and
    `store` (already open; closed by the keeper only when `owns_store`).
    """

    cache: ContentCache
    opener: StoreOpener | None = None
    _: KW_ONLY
    store: ContentStore | None = None
    owns_store: bool = True
    retry_s: float = RETRY_S
    settle_s: float = WATCH_SETTLE_S
    # Set while a watch is live and has settled (the cache is on).
    watching: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if (self.opener is None) == (self.store is None):
            raise ValueError("give exactly one of opener and store")

    def start(self) -> None:
        """Begin opening (if needed) and watching the store in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="registry-store-keeper")

    async def _open(self) -> ContentStore:
        assert self.opener is not None
        while True:
            try:
                store = await self.opener()
            except Exception as exc:
                log.warning("content store not available yet", error=str(exc))
                await asyncio.sleep(self.retry_s)
                continue
            log.info("content store opened", store=type(store).__name__)
            return store

    async def _run(self) -> None:
        if self.store is None:
            self.store = await self._open()
        store = self.store
        loop = asyncio.get_running_loop()
        while True:
            watch = store.watch()
            enable = loop.call_later(self.settle_s, self._enable)
            try:
                async for event in watch:
                    self.cache.invalidate(event)
                log.warning("content store watch ended; caching off until it is back")
            except Exception as exc:
                log.warning("content store watch failed; caching off", error=str(exc))
            finally:
                enable.cancel()
                self.watching.clear()
                self.cache.set_enabled(False)
                aclose = getattr(watch, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
            await asyncio.sleep(self.retry_s)

    def _enable(self) -> None:
        self.cache.set_enabled(True)
        self.watching.set()

    async def close(self) -> None:
        """Stop watching and close the store when this keeper opened it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.cache.set_enabled(False)
        if self.store is not None and self.owns_store:
            await self.store.close()
