"""Which registries this node mirrors, read from K3s registries.yaml and re-read when it changes.

The file is checked at most every `recheck_s` seconds (one stat), so operators can add mirrors
without restarting the registry. A missing file means nothing is mirrored (a K3s node without
mirrors takes no part); a file that becomes invalid keeps the last good answer and is logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from services.common.file_signature import FileSignature, file_signature
from services.common.k3s.registries import Registries, RegistriesError, load_registries
from services.common.logsetup import get_logger

DEFAULT_RECHECK_S = 2.0

log = get_logger(__name__)


@dataclass(eq=False)
class MirroredRegistries:
    """`is_mirrored(registry)` over a registries.yaml file, reloaded on change."""

    path: Path
    _: KW_ONLY
    recheck_s: float = DEFAULT_RECHECK_S
    clock: Callable[[], float] = time.monotonic
    # (inode, size, mtime) of the file as last read; None when it was absent.
    _signature: FileSignature = field(default=None, init=False)
    _registries: Registries = field(default_factory=Registries, init=False)
    _checked_at: float = field(default=float("-inf"), init=False)

    def __post_init__(self) -> None:
        self._reload()

    def _reload(self) -> None:
        self._checked_at = self.clock()
        signature = file_signature(self.path)
        if signature == self._signature and signature is not None:
            return
        try:
            registries = load_registries(self.path, missing_ok=True)
        except RegistriesError as exc:
            log.error("registries file invalid; keeping the previous mirrors", error=str(exc))
            self._signature = signature
            return
        self._registries, self._signature = registries, signature
        log.info(
            "mirrored registries loaded", path=str(self.path), mirrors=list(registries.mirrors)
        )

    def is_mirrored(self, registry: str) -> bool:
        return self.registries().is_mirrored(registry)

    def registries(self) -> Registries:
        """The registries file as last read (re-read when it changed), for upstream fetches."""
        if self.clock() - self._checked_at >= self.recheck_s:
            self._reload()
        return self._registries
