"""Builds the registry's Sanic application (routes and settings, no listening)."""

from __future__ import annotations

from sanic import Sanic
from sanic.config import Config

from services.common.config import NodeConfig
from services.common.k3s.mirror_policy import Policy
from services.common.logsetup import get_logger
from services.common.store.protocol import ContentStore
from services.registry import api, edge
from services.registry.backend import StoreKeeper, open_store
from services.registry.cache import ContentCache
from services.registry.content import ContentService
from services.registry.context import RegistryApp, RegistryContext
from services.registry.error_answers import MAX_REQUEST_BODY_BYTES
from services.registry.health import health
from services.registry.inflight.coordinator import Coordinator
from services.registry.inflight.metrics import InflightCollector
from services.registry.inflight.wiring import SharedFirstPulls
from services.registry.limits import ClientSlots, RequestLimits
from services.registry.metrics import RegistryMetrics
from services.registry.metrics import install as install_metrics
from services.registry.mirror.relay import Mirror
from services.registry.mirrored import MirroredRegistries
from services.registry.status_page import install as install_status_page

APP_NAME = "peermirror_registry"
# A 1 GiB blob to a slow client must not be cut: Sanic's response timeout only restarts when it
# writes itself, which the zero-copy path bypasses.
RESPONSE_TIMEOUT_S = 3600

# Sanic's touch-up (dropping unused signal dispatches from its hot path) rewrites its classes
# in place and fails when run a second time in one process: only the first app gets it. The
# service runs one app per process; tests run several.
_touchup_claimed = False

log = get_logger(__name__)


def build_policy(cfg: NodeConfig, mirrored: MirroredRegistries | None = None) -> Policy:
    """The serving policy `cfg.registry` describes (mirrors re-read from registries_file)."""
    if mirrored is None:
        mirrored = MirroredRegistries(cfg.registry.registries_file)
    return Policy(
        mirrored.is_mirrored,
        default_registry=cfg.registry.default_registry,
        allow_latest=cfg.registry.allow_latest,
        filters=cfg.registry.filters,
        taking_part=cfg.k3s.takes_part,
    )


def create_app(
    cfg: NodeConfig,
    *,
    name: str = APP_NAME,
    store: ContentStore | None = None,
    policy: Policy | None = None,
    inflight: Coordinator | None = None,
    shared_first_pulls: bool = False,
) -> RegistryApp:
    """A Sanic app for `cfg`; `name` must be unique per process (Sanic keeps a registry of apps).

    Without `store`, the store `cfg.store` names is opened (and retried) once the server starts
    and closed when it stops; a given `store` stays the caller's to close.
    """
    config = Config(env_prefix="PEERMIRROR_SANIC_")
    # We run inside our own asyncio loop, so none of Sanic's process management applies.
    config.MOTD = False
    config.AUTO_RELOAD = False
    # The edge writes one line per request (status and timing included) at every level.
    config.ACCESS_LOG = False
    config.NOISY_EXCEPTIONS = False
    # Errors Sanic answers itself (404 on unknown paths, 405) come back as JSON, not HTML.
    config.FALLBACK_ERROR_FORMAT = "json"
    config.GRACEFUL_SHUTDOWN_TIMEOUT = 2.0
    config.RESPONSE_TIMEOUT = RESPONSE_TIMEOUT_S
    # Slow or idle clients cannot hold a connection: the whole request must arrive within
    # request_timeout, and an idle keep-alive connection is closed after keep_alive_timeout.
    # (Sanic types these as int but times them as floats; update() takes them as given.)
    config.update(
        REQUEST_TIMEOUT=cfg.registry.request_timeout,
        KEEP_ALIVE_TIMEOUT=cfg.registry.keep_alive_timeout,
    )
    config.REQUEST_MAX_HEADER_SIZE = cfg.registry.max_header_bytes
    # A pull request has no body; a small cap keeps a client from making us buffer one.
    config.REQUEST_MAX_SIZE = MAX_REQUEST_BODY_BYTES
    global _touchup_claimed
    config.TOUCHUP = not _touchup_claimed
    _touchup_claimed = True
    cache = ContentCache()
    if store is None:
        keeper = StoreKeeper(cache, lambda: open_store(cfg))
    else:
        keeper = StoreKeeper(cache, store=store, owns_store=False)
    mirrored = MirroredRegistries(cfg.registry.registries_file)
    ctx = RegistryContext(
        cfg=cfg,
        policy=policy if policy is not None else build_policy(cfg, mirrored),
        content=ContentService(keeper),
        mirror=Mirror.from_config(cfg) if cfg.registry.peer_fetch else None,
        inflight=inflight if cfg.inflight.enabled else None,
        limits=RequestLimits.of(cfg.registry),
        relay_slots=ClientSlots(
            limit=cfg.registry.max_relays_per_client, local_limit=cfg.registry.max_local_relays
        ),
    )
    # configure_logging=False: Sanic's loggers propagate to the structlog handler from logsetup.
    app: RegistryApp = Sanic(name, config=config, ctx=ctx, configure_logging=False)
    ctx.metrics = RegistryMetrics(ctx)
    if ctx.mirror is not None:
        ctx.mirror.metrics = ctx.metrics.mirror
    owned: SharedFirstPulls | None = None
    if shared_first_pulls and ctx.inflight is None and cfg.inflight.enabled:
        owned = SharedFirstPulls.build(cfg, mirrored.registries, ctx.metrics.registry)
        ctx.inflight = owned.coordinator
    if ctx.inflight is not None:
        ctx.metrics.registry.register(InflightCollector(ctx.inflight))
    app.blueprint(health)
    install_metrics(app)
    install_status_page(app)
    api.install(app)
    edge.install(app)

    async def start_store(app: RegistryApp) -> None:
        keeper.start()
        if app.ctx.inflight is not None:
            try:
                app.ctx.inflight.pool.open()
            except OSError as exc:
                # A read-only root without a volume for the spool, say: the registry still
                # serves, and a miss nobody holds is a fast 404 again (containerd pulls itself).
                log.error(
                    "shared first pulls are off: the spool directory is unusable",
                    key="inflight.spool_dir",
                    path=str(app.ctx.inflight.pool.directory),
                    error=str(exc),
                )
                app.ctx.inflight = None

    async def stop_store(app: RegistryApp) -> None:
        await keeper.close()
        if owned is not None:
            await owned.close()
        elif app.ctx.inflight is not None:
            await app.ctx.inflight.close()
        if app.ctx.mirror is not None:
            await app.ctx.mirror.close()

    app.before_server_start(start_store)
    app.after_server_stop(stop_store)
    return app
