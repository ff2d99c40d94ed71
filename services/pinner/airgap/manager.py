"""The air-gap import agent: imports and pins the images directory, watches it, reports state.

Entry point for the pinner service: `AirgapManager(client, images_dir)`, then `await start()`
(drop our old pins, import everything, re-pin), `await run()` (watch loop, until cancelled),
`status()` and `rescan()` for the Pinner API, `await close()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from services.common.containerd.client import ContainerdClient
from services.common.containerd.errors import ContainerdError, ContainerdUnavailableError
from services.common.logsetup import get_logger
from services.pinner.airgap.budget import DEFAULT_MAX_DESCRIPTORS
from services.pinner.airgap.formats import FileKind
from services.pinner.airgap.importer import ArchiveImporter, ArchiveImportError
from services.pinner.airgap.ingest import IngestChannel
from services.pinner.airgap.layout import LayoutError
from services.pinner.airgap.pull import parse_list
from services.pinner.airgap.stream import ArchiveReadError
from services.pinner.airgap.watch import ChangeTracker, FileStat, scan
from services.pinner.cri import CRI_NAMESPACE, CriPuller
from services.pinner.pins import PinManager, managed_labels

if TYPE_CHECKING:
    from services.common.config import PinnerSection

log = get_logger(__name__)

ImportResultName = Literal["pending", "imported", "failed"]
# Files larger than this are not list files, whatever their name says.
LIST_MAX_BYTES = 1 << 20


class ListPullError(ArchiveImportError):
    """Some references of a list file could not be pulled; `images` were pulled and pinned."""

    def __init__(self, message: str, images: list[str]) -> None:
        super().__init__(message)
        self.images = tuple(images)


@dataclass(frozen=True, slots=True)
class ImportStatus:
    """The state of one file of the images directory."""

    path: Path
    result: ImportResultName
    error: str = ""
    images: tuple[str, ...] = ()
    size: int = 0
    finished_at: datetime | None = None


@dataclass(slots=True)
class _Counters:
    imported: int = 0
    failed: int = 0
    names: list[str] = field(default_factory=list)


class AirgapManager:
    """Imports `images_dir` into `client`'s namespace and keeps it imported and pinned.

    `pins` and `ingest` are the service's when it shares them (made here otherwise).
    """

    def __init__(
        self,
        client: ContainerdClient,
        images_dir: Path,
        *,
        pins: PinManager | None = None,
        ingest: IngestChannel | None = None,
        settle: float = 2.0,
        poll_interval: float = 1.0,
        max_import_descriptors: int = DEFAULT_MAX_DESCRIPTORS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.images_dir = images_dir
        self.poll_interval = poll_interval
        self.pins = pins if pins is not None else PinManager(client)
        self._cri_pins = PinManager(client.with_namespace(CRI_NAMESPACE))
        self._owns_ingest = ingest is None
        self._ingest = (
            ingest if ingest is not None else IngestChannel(client.address, client.namespace)
        )
        self._importer = ArchiveImporter(
            client, self._ingest, max_descriptors=max_import_descriptors
        )
        self._puller = CriPuller(self._ingest.channel)
        self._tracker = ChangeTracker(settle)
        self._clock = clock
        self._states: dict[Path, ImportStatus] = {}
        self._lock = asyncio.Lock()
        # Told (result "imported" or "failed", seconds) as each file's import ends (metrics).
        self.on_import: Callable[[str, float], None] | None = None

    @classmethod
    def from_config(
        cls,
        client: ContainerdClient,
        section: PinnerSection,
        *,
        pins: PinManager | None = None,
        ingest: IngestChannel | None = None,
    ) -> AirgapManager:
        return cls(
            client,
            section.images_dir,
            pins=pins,
            ingest=ingest,
            settle=section.import_settle,
            poll_interval=section.import_poll_interval,
            max_import_descriptors=section.max_import_descriptors,
        )

    async def close(self) -> None:
        if self._owns_ingest:
            await self._ingest.close()

    # --- the three phases ---------------------------------------------------------------------

    async def start(self) -> int:
        """Remove the pins we set before, then import and pin every file; returns files imported.

        Removing first is what makes a deleted archive's images unpinned after a restart.
        """
        async with self._lock:
            unpinned = await self.pins.unpin_managed()
            if self._cri_pins.client.namespace != self.client.namespace:
                unpinned += await self._cri_pins.unpin_managed()
            if unpinned:
                log.info("removed earlier import pins", images=len(unpinned))
            listing = scan(self.images_dir)
            self._tracker.forget_missing({p: st for p, (_, st) in listing.items()})
            counters = _Counters()
            for path, (kind, stat) in sorted(listing.items()):
                await self._import_one(path, kind, stat, counters)
            log.info(
                "images directory imported",
                directory=str(self.images_dir),
                imported=counters.imported,
                failed=counters.failed,
            )
            return counters.imported

    async def run(self) -> None:
        """Watch the directory until cancelled; containerd outages are waited out, not fatal."""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll_once()
            except ContainerdUnavailableError as exc:
                log.warning("containerd unavailable during import; retrying", error=str(exc))
                await self.client.wait_connected()

    async def poll_once(self) -> int:
        """One watch step: import the files that changed and settled; returns files imported."""
        async with self._lock:
            listing = scan(self.images_dir)
            stats = {p: st for p, (_, st) in listing.items()}
            ready = self._tracker.observe(self._clock(), stats)
            self._sync_pending(stats)
            counters = _Counters()
            for path in ready:
                kind, stat = listing[path]
                await self._import_one(path, kind, stat, counters)
            return counters.imported

    async def rescan(self) -> int:
        """Import every new or changed file now, without the settle delay (for Resync)."""
        async with self._lock:
            listing = scan(self.images_dir)
            stats = {p: st for p, (_, st) in listing.items()}
            counters = _Counters()
            for path in self._tracker.changed(stats):
                kind, stat = listing[path]
                await self._import_one(path, kind, stat, counters)
            return counters.imported

    # --- status -------------------------------------------------------------------------------

    def status(self) -> list[ImportStatus]:
        """One entry per known file of the images directory, sorted by path."""
        return [self._states[p] for p in sorted(self._states)]

    def _sync_pending(self, stats: dict[Path, FileStat]) -> None:
        for path in list(self._states):
            if path not in stats:
                del self._states[path]
        for path in self._tracker.pending():
            previous = self._states.get(path)
            if previous is None or previous.result != "pending":
                self._states[path] = ImportStatus(path, "pending", size=stats[path].size)

    # --- one file -----------------------------------------------------------------------------

    async def _import_one(
        self, path: Path, kind: FileKind, stat: FileStat, counters: _Counters
    ) -> None:
        self._states[path] = ImportStatus(path, "pending", size=stat.size)
        started = time.monotonic()
        try:
            if kind is FileKind.LIST:
                names = await self._pull_list(path)
            else:
                names = await self._importer.import_archive(path, kind, managed_labels(str(path)))
        except ContainerdUnavailableError:
            # Not the file's fault: leave it unrecorded so it is retried once containerd is back.
            self._states[path] = ImportStatus(path, "pending", size=stat.size)
            raise
        except (
            ArchiveReadError,
            ArchiveImportError,
            LayoutError,
            ContainerdError,
            OSError,
            ValueError,
        ) as exc:
            counters.failed += 1
            self._tracker.record(path, stat)
            self._states[path] = ImportStatus(
                path,
                "failed",
                error=str(exc),
                images=exc.images if isinstance(exc, ListPullError) else (),
                size=stat.size,
                finished_at=datetime.now(UTC),
            )
            log.error("image import failed", file=str(path), error=str(exc))
            if self.on_import is not None:
                self.on_import("failed", time.monotonic() - started)
            return
        counters.imported += 1
        counters.names.extend(names)
        self._tracker.record(path, stat)
        self._states[path] = ImportStatus(
            path,
            "imported",
            images=tuple(names),
            size=stat.size,
            finished_at=datetime.now(UTC),
        )
        log.info(
            "images imported and pinned",
            file=str(path),
            images=names,
            seconds=round(time.monotonic() - started, 3),
        )
        if self.on_import is not None:
            self.on_import("imported", time.monotonic() - started)

    async def _pull_list(self, path: Path) -> list[str]:
        refs = parse_list(await asyncio.to_thread(_read_list, path))
        pinned: list[str] = []
        failures: list[str] = []
        for ref in refs:
            try:
                await self._puller.pull(ref)
                image = await self._cri_pins.resolve(ref)
                names = [
                    img.name
                    for img in await self._cri_pins.client.list_images(
                        f"target.digest=={image.target.digest}"
                    )
                ]
                await self._cri_pins.pin_managed(names, str(path))
                pinned.extend(n for n in names if n not in pinned)
            except ContainerdUnavailableError:
                raise
            except (ContainerdError, ValueError) as exc:
                failures.append(f"{ref}: {exc}")
        if failures:
            # The images that did come are pinned all the same; the file is reported failed
            # so the operator sees which references could not be pulled.
            raise ListPullError("; ".join(failures), pinned)
        return pinned


def _read_list(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(LIST_MAX_BYTES + 1)
    if len(data) > LIST_MAX_BYTES:
        raise ValueError(f"{path.name}: list file larger than {LIST_MAX_BYTES} bytes")
    return data.decode("utf-8", errors="replace")
