"""Runs the pinner service: writes containerd's mirror config, then keeps discovery told what the
node's containerd holds, with its node-local gRPC API (health SERVING once the first sync ran)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from services.common.cancellation import cancel_and_wait
from services.common.config import NodeConfig, parse_major_minor
from services.common.containerd.client import ContainerdClient
from services.common.containerd.errors import ContainerdUnavailableError
from services.common.grpc_server import GrpcServer, run_until_signal
from services.common.k3s.mirror_policy import Policy
from services.common.k3s.registries import Registries, RegistriesError, load_registries
from services.common.logsetup import get_logger
from services.common.metrics import start_listener
from services.common.store.containerd_store import ContainerdStore
from services.common.store.oci_layout import OciLayoutStore
from services.common.store.protocol import ContentStore
from services.common.tls import tls_files
from services.pinner.advertiser import BATCH_SIZE as ADVERTISE_BATCH
from services.pinner.advertiser import Advertiser
from services.pinner.airgap.ingest import IngestChannel
from services.pinner.airgap.manager import AirgapManager
from services.pinner.api import PinnerApi, SyncOutcome, SyncState
from services.pinner.cri import CRI_NAMESPACE
from services.pinner.hosts_keeper import HostsKeeper
from services.pinner.hosts_toml import HostsOptions
from services.pinner.hosts_writer import HostsLockedError, write_containerd_config
from services.pinner.keys import KeyPolicy
from services.pinner.metrics import PinnerMetrics
from services.pinner.pins import PinManager
from services.pinner.prefetch import Prefetcher
from services.pinner.tracker import Tracker

# Leaves headroom inside the 5 s the node and kubelet allow between SIGTERM and exit.
STOP_BUDGET = 4.0
# Exit code for a configuration the pinner cannot start with (as `peermirror` uses for config).
EXIT_CONFIG = 2
# Seconds the start waits for another hosts.toml writer before leaving it to the keeper.
START_LOCK_WAIT = 2.0

log = get_logger(__name__)


def _path(value: Path | None) -> str | None:
    return None if value is None else str(value)


def hosts_options(cfg: NodeConfig) -> HostsOptions:
    """How this node's hosts.toml files look, from its config."""
    p = cfg.pinner
    # Unless the pinner section names others, containerd trusts the cluster CA and presents
    # this node's own certificate (the tls section) to the embedded registry.
    tls = tls_files(cfg)
    return HostsOptions(
        # K3s embedded-registry false: hosts.toml keeps the registries.yaml endpoints only.
        embedded_mirror=cfg.k3s.takes_part,
        mirror_port=cfg.registry.port,
        mirror_tls=p.mirror_tls,
        ca_file=_path(p.ca_file or (tls.ca_file if tls else None)),
        client_cert_file=_path(p.client_cert_file or (tls.cert_file if tls else None)),
        client_key_file=_path(p.client_key_file or (tls.key_file if tls else None)),
        disable_default_endpoint=p.disable_default_endpoint,
        containerd_version=parse_major_minor(p.containerd_version),
        flavour=p.containerd_flavour,
        dial_timeout=p.dial_timeout,
    )


def key_policy(cfg: NodeConfig, is_mirrored: Callable[[str], bool]) -> KeyPolicy:
    """The advertising rules: the registry's serving policy over this node's mirrors."""
    policy = Policy(
        is_mirrored,
        allow_latest=cfg.registry.allow_latest,
        filters=cfg.registry.filters,
    )
    return KeyPolicy(policy)


def participates(cfg: NodeConfig, registries: Registries) -> bool:
    """K3s: a node takes part when embedded-registry allows and it mirrors some registry."""
    return bool(registries.mirrors) and cfg.k3s.takes_part


def prepare(cfg: NodeConfig) -> Registries:
    """Read registries.yaml (missing = nothing mirrored) and write hosts.toml from it.

    Raises RegistriesError (naming the file and key) with nothing on disk changed.
    """
    registries = load_registries(cfg.registry.registries_file, missing_ok=True)
    if cfg.pinner.write_hosts:
        try:
            write_containerd_config(
                cfg.registry.registries_file,
                cfg.pinner.certs_dir,
                hosts_options(cfg),
                missing_ok=True,
                lock_timeout=START_LOCK_WAIT,
            )
        except HostsLockedError as exc:
            # `peermirror containerd-config` is writing: the hosts keeper writes once it is done.
            log.warning(
                "hosts.toml not written at start; another writer holds them", error=str(exc)
            )
    return registries


def hosts_keeper(cfg: NodeConfig) -> HostsKeeper:
    """What follows registries.yaml while the pinner runs, and keeps the hosts.toml files
    right unless `pinner.write_hosts` is false."""
    return HostsKeeper(
        cfg.registry.registries_file,
        cfg.pinner.certs_dir,
        hosts_options(cfg),
        interval=cfg.pinner.hosts_check_interval,
        write=cfg.pinner.write_hosts,
    )


class PinnerRuntime:
    """The pinner's long-running parts, started and stopped together (also used by tests).

    Pins, prefetch and air-gap import run on every containerd node; tracking and advertising
    only on a node that mirrors at least one registry. With the oci-layout store (dev boxes, the
    local mesh) the layout directory is tracked instead of containerd, and there is nothing to
    pin, pull through or import into.
    """

    def __init__(self, cfg: NodeConfig, registries: Registries, *, airgap: bool = True) -> None:
        self.cfg = cfg
        self.registries = registries
        # Asks the registries in effect now: registries.yaml may be edited while running.
        self.policy = key_policy(cfg, lambda registry: self.registries.is_mirrored(registry))
        self.policy.update(mirrors_anything=participates(cfg, registries))
        self.client: ContainerdClient | None = None
        self.store: ContentStore
        self.pins: PinManager | None = None
        self.prefetcher: Prefetcher | None = None
        self.ingest: IngestChannel | None = None
        self.airgap: AirgapManager | None = None
        if cfg.store.backend == "oci-layout":
            self.store = OciLayoutStore(cfg.store.oci_layout_path, create=True)
            if airgap:
                log.info(
                    "air-gap import needs containerd; not importing with the oci-layout store",
                    images_dir=str(cfg.pinner.images_dir),
                )
        else:
            self.client = ContainerdClient(
                cfg.store.containerd_address, cfg.store.containerd_namespace
            )
            root = cfg.store.content_root
            self.store = ContainerdStore(
                self.client, root, find_root=root is None, report_collections=True
            )
            self.pins = PinManager(self.client)
            # Imports and prefetches move bulk data on a connection of their own.
            self.ingest = IngestChannel(self.client.address, self.client.namespace)
            # Prefetches pull through containerd's CRI, which writes into its own namespace.
            self.prefetcher = Prefetcher(self.ingest.channel, CRI_NAMESPACE)
            if airgap:
                self.airgap = AirgapManager.from_config(
                    self.client, cfg.pinner, pins=self.pins, ingest=self.ingest
                )
        self.advertiser: Advertiser | None = None
        self.tracker: Tracker | None = None
        # Also on a node that takes no part or mirrors nothing yet: registries.yaml may change.
        self.hosts = hosts_keeper(cfg)
        self.hosts.on_registries = self.registries_changed
        self._tasks: list[asyncio.Task[None]] = []
        # A re-walk after a registries.yaml edit: finite, so kept apart from `_tasks` (whose
        # ending would mean a crash).
        self._mirrors_resync: asyncio.Task[None] | None = None
        self._mirrors_changed = False
        self._started = False
        if not cfg.k3s.takes_part:
            log.warning(
                "K3s embedded-registry is false: this node takes no part; advertising nothing",
                node=cfg.node.name,
            )
            return
        if not self.policy.mirrors_anything:
            # K3s: a node that mirrors no registry takes no part in the peer network.
            log.info(
                "no registry is mirrored on this node; advertising nothing",
                registries_file=str(cfg.registry.registries_file),
            )
            return
        self._create_tracking()

    def _create_tracking(self) -> None:
        cfg = self.cfg
        # Never more keys per call than discovery accepts.
        self.advertiser = Advertiser(
            cfg.discovery.local_address,
            batch_size=min(ADVERTISE_BATCH, cfg.discovery.max_keys_per_advertise),
            max_message_bytes=cfg.grpc.max_message_bytes,
        )
        self.tracker = Tracker(
            self.store,
            self.policy,
            self.advertiser.apply,
            resync_interval=cfg.pinner.resync_interval,
        )

    def register(self, server: GrpcServer) -> None:
        """Serve the Pinner API on `server` (before it starts)."""
        PinnerApi(
            self.pins,
            prefetcher=self.prefetcher,
            airgap=self.airgap,
            sync_state=self.sync_state,
            resync=self.resync,
        ).register(server)

    def start(self) -> None:
        self._started = True
        self._spawn(self.hosts.run(), "hosts")
        self._start_tracking()
        if self.airgap is not None:
            self._spawn(self._run_airgap(self.airgap), "airgap")

    def _start_tracking(self) -> None:
        if self.tracker is not None and self.advertiser is not None:
            self._spawn(self.advertiser.run(), "advertiser")
            self._spawn(self.tracker.run(), "tracker")

    async def registries_changed(self, registries: Registries) -> None:
        """registries.yaml now says `registries`: advertise what is mirrored now, and only that."""
        before, self.registries = set(self.registries.mirrors), registries
        if set(registries.mirrors) == before:
            return
        taking_part = participates(self.cfg, registries)
        self.policy.update(mirrors_anything=taking_part)
        log.info("mirrored registries changed", mirrors=sorted(registries.mirrors))
        if self.tracker is None:
            if taking_part:
                # A node that mirrored nothing at start takes part from now on.
                self._create_tracking()
                if self._started:
                    self._start_tracking()
            return
        self._mirrors_changed = True
        if self._mirrors_resync is None or self._mirrors_resync.done():
            # Apart from the caller, so a long re-walk does not hold up the hosts.toml checks.
            self._mirrors_resync = asyncio.create_task(
                self._resync_for_mirrors(self.tracker), name="pinner-mirrors-resync"
            )

    async def _resync_for_mirrors(self, tracker: Tracker) -> None:
        # An edit made during a re-walk may come after images it already decided: walk again.
        while self._mirrors_changed:
            self._mirrors_changed = False
            try:
                await tracker.resync()
            except Exception as exc:
                # The tracker's next full sync (on reconnect, or every resync_interval) does it.
                log.warning("could not re-walk the store for the new mirrors", error=str(exc))
                return

    @property
    def running(self) -> bool:
        """Whether every background task is still alive (none crashed or ended)."""
        return all(not task.done() for task in self._tasks)

    async def _run_airgap(self, airgap: AirgapManager) -> None:
        # containerd may not be up yet (or restart during the first pass): wait, then redo it.
        while True:
            try:
                await airgap.start()
                break
            except ContainerdUnavailableError as exc:
                log.warning(
                    "containerd unavailable for the air-gap import; waiting", error=str(exc)
                )
                await airgap.client.wait_connected()
        await airgap.run()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"pinner-{name}"))

    async def wait_synced(self) -> None:
        """Return once the first full sync is done (at once when nothing is tracked)."""
        if self.tracker is not None:
            await self.tracker.synced.wait()

    def sync_state(self) -> SyncState:
        """What the status API reports about tracking and advertising."""
        tracker = self.tracker
        if tracker is None:
            return SyncState(participating=False)
        return SyncState(
            participating=True,
            containerd_connected=tracker.connected,
            last_sync=tracker.last_sync,
            last_sync_error=tracker.last_error,
            advertised_keys=len(tracker.index.keys),
        )

    async def resync(self) -> SyncOutcome:
        """A full sync now (the API's Resync); nothing when the node takes no part."""
        if self.tracker is None:
            return SyncOutcome()
        delta = await self.tracker.resync()
        return SyncOutcome(advertised=len(delta.added), withdrawn=len(delta.removed))

    async def stop(self) -> None:
        # Bounded: a task that swallows its cancel (grpc.aio can, mid-call) must not hold the
        # stop, and one task's error must not skip closing the clients below.
        tasks = [*self._tasks, *([self._mirrors_resync] if self._mirrors_resync else [])]
        await cancel_and_wait(tasks, within=2.0, owner="pinner")
        self._tasks.clear()
        if self.airgap is not None:
            await self.airgap.close()
        if self.ingest is not None:
            await self.ingest.close()
        await self.store.close()
        if self.client is not None:
            await self.client.close()


async def run(cfg: NodeConfig) -> None:
    """Serve until SIGTERM/SIGINT, then stop within the budget."""
    try:
        registries = prepare(cfg)
    except RegistriesError as exc:
        log.error("invalid registries file; not starting", error=str(exc))
        raise SystemExit(EXIT_CONFIG) from exc
    runtime = PinnerRuntime(cfg, registries)
    local = GrpcServer(
        cfg.pinner.grpc_address, name="pinner-local", max_message_bytes=cfg.grpc.max_message_bytes
    )
    runtime.register(local)
    metrics = PinnerMetrics(runtime)
    try:
        await local.start(serving=False)
    except BaseException:
        await runtime.stop()
        raise
    runtime.start()
    listener = await start_listener(
        cfg.pinner.metrics_address, metrics.registry, service="pinner", refresh=metrics.refresh
    )

    async def report_ready() -> None:
        await runtime.wait_synced()
        for service in ["", *local.service_names]:
            await local.set_serving(service, True)
        log.info("pinner ready")

    ready = asyncio.create_task(report_ready())
    if cfg.store.backend == "oci-layout":
        where = {"oci_layout": str(cfg.store.oci_layout_path)}
    else:
        where = {
            "containerd": cfg.store.containerd_address,
            "namespace": cfg.store.containerd_namespace,
        }
    log.info("pinner started", node=cfg.node.name, grpc_address=local.bound_address, **where)

    async def stop() -> None:
        ready.cancel()
        if listener is not None:
            await listener.stop()
        await local.stop()
        await runtime.stop()

    await run_until_signal(stop, stop_timeout=STOP_BUDGET)
    log.info("pinner stopped")
