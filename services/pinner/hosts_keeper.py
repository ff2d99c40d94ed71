"""Keeps containerd's hosts.toml files as registries.yaml says while the pinner runs.

K3s rewrites certs.d from registries.yaml each time it starts (its files have no embedded
mirror), and operators edit registries.yaml on a running node. Every `interval` seconds the
keeper re-reads registries.yaml when its stat changed and compares the files it may write with
what it would write; on any difference it writes them back under the certs.d lock (see
hosts_writer). A hand-written directory is never a difference, so it is never written and the
warning about it is only logged when a write happens for another reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from services.common.file_signature import file_signature
from services.common.k3s.registries import Registries, RegistriesError, load_registries
from services.common.logsetup import get_logger
from services.pinner.hosts_toml import HostsOptions, render_hosts_files
from services.pinner.hosts_writer import (
    HostsLockedError,
    in_step,
    log_report,
    write_hosts_files,
)

log = get_logger(__name__)

# Seconds a check waits for the certs.d lock: the thread it runs in must end soon after a stop.
MAX_LOCK_WAIT = 1.0
# Differs from every signature, a missing file's (None) included.
_NEVER = object()


@dataclass(eq=False)
class HostsKeeper:
    """Puts `certs_dir` right whenever it differs from what `registries_file` renders to."""

    registries_file: Path
    certs_dir: Path
    opts: HostsOptions
    _: KW_ONLY
    interval: float
    write: bool = True
    # Told each registries.yaml that was read anew (on the event loop).
    on_registries: Callable[[Registries], Awaitable[None]] | None = field(default=None, init=False)
    _loaded: object = field(default=_NEVER, init=False)
    _files: dict[str, str] | None = field(default=None, init=False)
    _warnings: tuple[str, ...] = field(default=(), init=False)

    def _reload(self) -> Registries | None:
        signature = file_signature(self.registries_file)
        if signature == self._loaded:
            return None
        self._loaded = signature
        try:
            # Missing means nothing is mirrored (K3s): our directories go.
            registries = load_registries(self.registries_file, missing_ok=True)
            rendered = render_hosts_files(registries, self.opts)
        except RegistriesError as exc:
            # Logged once per version of the file; the last good files stay in place.
            log.error("registries file invalid; keeping the hosts.toml files", error=str(exc))
            return None
        self._files, self._warnings = rendered.files, rendered.warnings
        log.info(
            "registries file read",
            path=str(self.registries_file),
            mirrors=sorted(registries.mirrors),
        )
        return registries

    def check(self) -> Registries | None:
        """One check (blocking file I/O: run it in a thread): re-read registries.yaml if it
        changed and put the hosts.toml files right; returns the registries read anew."""
        registries = self._reload()
        files = self._files
        if self.write and files is not None and not in_step(self.certs_dir, files):
            self._write(files)
        return registries

    def _write(self, files: dict[str, str]) -> None:
        try:
            # Waits a little for another writer (`peermirror containerd-config`); the next
            # check tries again.
            report = write_hosts_files(
                self.certs_dir, files, lock_timeout=min(self.interval, MAX_LOCK_WAIT)
            )
        except HostsLockedError as exc:
            log.info("another writer holds the hosts.toml files; retrying", error=str(exc))
            return
        log_report(self.certs_dir, report, self._warnings)

    async def run(self) -> None:
        """Check every `interval` seconds until cancelled; I/O errors are logged and retried."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                registries = await asyncio.to_thread(self.check)
            except OSError as exc:
                log.warning("could not put the hosts.toml files right", error=str(exc))
                continue
            if registries is not None and self.on_registries is not None:
                await self.on_registries(registries)
