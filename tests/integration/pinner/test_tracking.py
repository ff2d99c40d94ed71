"""The pinner's tracking on a real containerd: what the node holds is advertised, what goes away is
withdrawn, containerd restarts are survived. Discovery is the in-memory fake on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.config import NodeConfig, load_config
from services.common.containerd.client import ContainerdClient
from services.common.k3s.registries import load_registries
from services.common.store.containerd_watch import COLLECTION_DELAYS_S
from services.common.store.protocol import Descriptor
from services.pinner.hosts_writer import LOCK_FILE
from services.pinner.service import PinnerRuntime
from tests.harness.containerd import ContainerdDaemon
from tests.harness.containerd_store_factory import import_image
from tests.harness.fake_discovery import FakeDiscovery
from tests.harness.images import OCI_CONFIG, OCI_MANIFEST, BuiltImage, build_image
from tests.harness.wait import wait_until
from tests.integration.pinner.runtime import WAIT_S, keys_of, pinner, wait_keys

pytestmark = pytest.mark.containerd

# The bound for an imported image to be advertised.
ADVERTISE_WITHIN_S = 2.0
# A collection this long after its image's delete is one the pinner's early re-checks miss.
LATE_COLLECTION_S = 12.0
# A collection shows by the pinner's last re-check after a delete (its resync is minutes away).
COLLECTION_WITHIN_S = COLLECTION_DELAYS_S[-1] + 10.0
GC_REF = "containerd.io/gc.ref.content"


def node_config(
    tmp_path: Path,
    daemon: ContainerdDaemon,
    namespace: str,
    discovery_address: str,
    registries_yaml: str | None,
    *,
    allow_latest: bool = False,
) -> NodeConfig:
    registries_file = tmp_path / "registries.yaml"
    if registries_yaml is not None:
        registries_file.write_text(registries_yaml)
    base = load_config(None, {})
    return dataclasses.replace(
        base,
        registry=dataclasses.replace(
            base.registry, registries_file=registries_file, allow_latest=allow_latest
        ),
        discovery=dataclasses.replace(base.discovery, local_address=discovery_address),
        pinner=dataclasses.replace(
            base.pinner, certs_dir=tmp_path / "certs.d", grpc_address="127.0.0.1:0"
        ),
        store=dataclasses.replace(
            base.store, containerd_address=daemon.address, containerd_namespace=namespace
        ),
    )


async def settled(runtime: PinnerRuntime, name: str) -> None:
    """Until the tracker has taken in image `name` and the advertiser has pushed what followed."""
    tracker, advertiser = runtime.tracker, runtime.advertiser
    assert tracker is not None and advertiser is not None
    await wait_until(lambda: name in tracker.index.images, WAIT_S, what=f"{name} tracked")
    async with asyncio.timeout(WAIT_S):
        await advertiser.wait_idle()


async def wait_superset(disco: FakeDiscovery, want: set[str], within: float) -> None:
    async with asyncio.timeout(within):
        await disco.wait_for(lambda keys: want <= keys)


async def put_blob(client: ContainerdClient, data: bytes, labels: dict[str, str]) -> Descriptor:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await client.write_content(
        f"pm-test-{digest[7:19]}", data, expected=digest, size=len(data), labels=labels
    )
    return Descriptor(digest=digest, size=len(data), media_type="")


async def image_sharing_first_layer(
    client: ContainerdClient, other: BuiltImage, name: str, *, protect_layer: bool
) -> tuple[Descriptor, Descriptor]:
    """Create image `name` whose only layer is `other`'s first one; returns (manifest, config).

    With `protect_layer` False the manifest carries no GC reference to the layer, so containerd's
    collector removes it as soon as `other` is gone — without publishing any event.
    """
    layer = other.platforms[0].layers[0]
    config_body = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {"peermirror.test/name": name}},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        }
    ).encode()
    config = await put_blob(client, config_body, {"containerd.io/gc.root": "test"})
    manifest_body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size},
            "layers": [
                {
                    "mediaType": layer.descriptor.media_type,
                    "digest": layer.descriptor.digest,
                    "size": layer.descriptor.size,
                }
            ],
        }
    ).encode()
    # Rooted until the image holds it: content nothing refers to may be collected at any time.
    labels = {f"{GC_REF}.config": config.digest, "containerd.io/gc.root": "test"}
    if protect_layer:
        labels[f"{GC_REF}.l.0"] = layer.descriptor.digest
    manifest = await put_blob(client, manifest_body, labels)
    target = Descriptor(manifest.digest, manifest.size, OCI_MANIFEST)
    await client.create_image(name, target)
    # The image now holds manifest and config; they need no root of their own any more.
    for held in (manifest, config):
        await client.update_content_labels(held.digest, {"containerd.io/gc.root": None})
    return manifest, config


DOCKER_HUB_ONLY = "mirrors:\n  docker.io: {}\n"


@pytest.mark.parametrize("protect_layer", [True, False], ids=["gc-ref", "no-gc-ref"])
async def test_import_advertises_and_delete_withdraws_only_what_is_gone(
    tmp_path: Path,
    containerd_daemon: ContainerdDaemon,
    containerd_namespace: str,
    protect_layer: bool,
) -> None:
    a = build_image(tmp_path / "a", "docker.io/library/alpha:1", layers=2, layer_size=4096)
    async with (
        FakeDiscovery() as disco,
        ContainerdClient(containerd_daemon.address, containerd_namespace) as client,
    ):
        cfg = node_config(
            tmp_path, containerd_daemon, containerd_namespace, disco.address, DOCKER_HUB_ONLY
        )
        async with pinner(cfg):
            await import_image(containerd_daemon, containerd_namespace, a)
            await wait_superset(disco, keys_of(a), ADVERTISE_WITHIN_S)
            await wait_keys(disco, keys_of(a))

            b_name = "docker.io/library/beta:1"
            manifest, config = await image_sharing_first_layer(
                client, a, b_name, protect_layer=protect_layer
            )
            shared = a.platforms[0].layers[0].descriptor.digest
            await wait_keys(disco, keys_of(a) | {manifest.digest, config.digest, b_name})

            # No sync: containerd's collector runs on its own after the delete, unannounced.
            await client.delete_image(a.name)
            b_keys = {manifest.digest, config.digest, b_name}
            if protect_layer:
                await wait_keys(disco, b_keys | {shared})
                withdrawn = {k for kind, keys in disco.calls if kind == "withdraw" for k in keys}
                assert shared not in withdrawn
                assert withdrawn == keys_of(a) - {shared}
            else:
                # The layer B did not protect is collected; the pinner notices without an event.
                await wait_keys(disco, b_keys, within=COLLECTION_WITHIN_S)
                assert not containerd_daemon.blob_path(shared).exists()


async def test_content_collected_long_after_its_image_was_deleted_is_withdrawn(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    # containerd collects on a schedule of its own: 50x its last collection's duration after a
    # delete, so a collection of 0.2 s on a node holding many images puts the next one 10 s
    # away. Here the shared layer is kept (a gc.root label) past the pinner's first re-checks,
    # then let go and collected by a collection another namespace triggers, which this
    # namespace sees no event of: the pinner must still withdraw it, not only at its resync.
    a = build_image(tmp_path / "a", "docker.io/library/gamma:1", layers=2, layer_size=4096)
    shared = a.platforms[0].layers[0].descriptor.digest
    async with (
        FakeDiscovery() as disco,
        ContainerdClient(containerd_daemon.address, containerd_namespace) as client,
        ContainerdClient(containerd_daemon.address, containerd_namespace + "-gc") as elsewhere,
    ):
        cfg = node_config(
            tmp_path, containerd_daemon, containerd_namespace, disco.address, DOCKER_HUB_ONLY
        )
        async with pinner(cfg):
            await import_image(containerd_daemon, containerd_namespace, a)
            await wait_keys(disco, keys_of(a))
            b_name = "docker.io/library/delta:1"
            manifest, config = await image_sharing_first_layer(
                client, a, b_name, protect_layer=False
            )
            b_keys = {manifest.digest, config.digest, b_name}
            await wait_keys(disco, keys_of(a) | b_keys)
            await client.update_content_labels(shared, {"containerd.io/gc.root": "test"})
            await client.delete_image(a.name)
            await wait_keys(disco, b_keys | {shared})
            # Past the re-checks a collection within seconds of the delete would meet.
            await asyncio.sleep(LATE_COLLECTION_S)  # a fixed delay on purpose: it is the fault
            await client.update_content_labels(shared, {"containerd.io/gc.root": None})
            dummy = await put_blob(elsewhere, b"{}", {})
            await elsewhere.create_image(
                "docker.io/library/dummy:1", dataclasses.replace(dummy, media_type=OCI_CONFIG)
            )
            await elsewhere.delete_image("docker.io/library/dummy:1", sync=True)
            assert not containerd_daemon.blob_path(shared).exists()
            await wait_keys(disco, b_keys, within=COLLECTION_WITHIN_S)


async def test_multi_platform_index_and_digest_reference(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    image = build_image(
        tmp_path / "m",
        "docker.io/library/multi:2",
        layers=1,
        layer_size=2048,
        platforms=["linux/amd64", "linux/arm64/v8"],
    )
    async with FakeDiscovery() as disco:
        cfg = node_config(
            tmp_path, containerd_daemon, containerd_namespace, disco.address, DOCKER_HUB_ONLY
        )
        async with pinner(cfg) as runtime:
            await import_image(containerd_daemon, containerd_namespace, image)
            await wait_keys(disco, keys_of(image))
            # A name@digest record of the same index adds no key; removing the tag leaves the
            # digests, still held by the digest reference.
            async with ContainerdClient(containerd_daemon.address, containerd_namespace) as c:
                by_digest = f"docker.io/library/multi@{image.target.digest}"
                await c.create_image(by_digest, image.target)
                await settled(runtime, by_digest)
                assert disco.keys == keys_of(image)
                await c.delete_image(image.name)
            await wait_keys(disco, keys_of(image, tag=False))
            assert runtime.tracker is not None
            assert runtime.tracker.watch_proven


@pytest.mark.parametrize("allow_latest", [False, True], ids=["latest-off", "latest-on"])
async def test_only_mirrored_registries_and_latest_rule(
    tmp_path: Path,
    containerd_daemon: ContainerdDaemon,
    containerd_namespace: str,
    allow_latest: bool,
) -> None:
    other = build_image(tmp_path / "o", "docker.io/library/other:1", layers=1, layer_size=1024)
    app = build_image(tmp_path / "q1", "quay.io/org/app:1", layers=1, layer_size=1024, seed=1)
    latest = build_image(tmp_path / "q2", "quay.io/org/app:latest", layers=1, layer_size=1024)
    async with FakeDiscovery() as disco:
        cfg = node_config(
            tmp_path,
            containerd_daemon,
            containerd_namespace,
            disco.address,
            "mirrors:\n  quay.io: {}\n",
            allow_latest=allow_latest,
        )
        async with pinner(cfg):
            # Imported first: had its keys been advertised, they would be there by the end.
            await import_image(containerd_daemon, containerd_namespace, other)
            await import_image(containerd_daemon, containerd_namespace, app)
            await import_image(containerd_daemon, containerd_namespace, latest)
            await wait_keys(disco, keys_of(app) | keys_of(latest, tag=allow_latest))
        assert not (disco.keys & keys_of(other))


async def test_a_node_mirroring_nothing_takes_no_part(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    image = build_image(tmp_path / "n", "docker.io/library/none:1", layers=1, layer_size=1024)
    async with FakeDiscovery() as disco:
        cfg = node_config(tmp_path, containerd_daemon, containerd_namespace, disco.address, None)
        assert load_registries(cfg.registry.registries_file, missing_ok=True).mirrors == {}
        async with pinner(cfg) as runtime:
            assert runtime.tracker is None and runtime.advertiser is None
            await import_image(containerd_daemon, containerd_namespace, image)
            await asyncio.sleep(0.5)  # a fixed pause on purpose: nothing is advertised meanwhile
        assert disco.calls == [] and disco.keys == set()
        # The certs.d directory exists and holds no generated configuration, only the
        # writers' lock file.
        assert [p.name for p in cfg.pinner.certs_dir.iterdir()] == [LOCK_FILE]


@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_containerd_restart_under_a_running_pinner(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str, how: str
) -> None:
    before = build_image(tmp_path / "b", "docker.io/library/before:1", layers=1, layer_size=1024)
    after = build_image(tmp_path / "c", "docker.io/library/after:1", layers=1, layer_size=1024)
    async with FakeDiscovery() as disco:
        cfg = node_config(
            tmp_path, containerd_daemon, containerd_namespace, disco.address, DOCKER_HUB_ONLY
        )
        async with pinner(cfg) as runtime:
            assert runtime.tracker is not None
            await import_image(containerd_daemon, containerd_namespace, before)
            await wait_keys(disco, keys_of(before))
            sessions = runtime.tracker.sessions
            if how == "restart":
                containerd_daemon.restart()
            else:
                containerd_daemon.kill()
                # The pinner notices containerd gone and runs on without it.
                tracker = runtime.tracker
                await wait_until(lambda: not tracker.connected, WAIT_S, what="containerd lost")
                assert runtime.running
                containerd_daemon.start()
            # Imported right after the restart, possibly before the pinner resubscribed.
            await import_image(containerd_daemon, containerd_namespace, after)
            await wait_keys(disco, keys_of(before) | keys_of(after))
            # `after` can only have come through a new session: the old one's daemon is gone.
            assert runtime.tracker.sessions > sessions
            assert runtime.running


# registries.yaml edited on a running node: the advertised keys follow within seconds.
FOLLOWS_WITHIN_S = 5.0


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@contextlib.asynccontextmanager
async def node_following(
    tmp_path: Path, daemon: ContainerdDaemon, namespace: str, registries_yaml: str | None
) -> AsyncIterator[tuple[FakeDiscovery, Path, PinnerRuntime]]:
    """A running pinner; yields its discovery, its registries.yaml (to edit) and itself."""
    async with FakeDiscovery() as disco:
        cfg = node_config(tmp_path, daemon, namespace, disco.address, registries_yaml)
        async with pinner(cfg) as runtime:
            yield disco, cfg.registry.registries_file, runtime


async def test_a_registry_added_to_registries_yaml_is_advertised(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    hub = build_image(tmp_path / "h", "docker.io/library/hub:1", layers=1, layer_size=1024)
    quay = build_image(tmp_path / "q", "quay.io/team/app:1", layers=1, layer_size=1024)
    async with node_following(
        tmp_path, containerd_daemon, containerd_namespace, DOCKER_HUB_ONLY
    ) as (disco, registries, _runtime):
        await import_image(containerd_daemon, containerd_namespace, hub)
        await import_image(containerd_daemon, containerd_namespace, quay)
        await wait_keys(disco, keys_of(hub))
        write_atomic(registries, "mirrors:\n  docker.io: {}\n  quay.io: {}\n")
        await wait_keys(disco, keys_of(hub) | keys_of(quay), within=FOLLOWS_WITHIN_S)
        write_atomic(registries, "mirrors:\n  quay.io: {}\n")
        await wait_keys(disco, keys_of(quay), within=FOLLOWS_WITHIN_S)


async def test_a_node_mirroring_nothing_takes_part_once_a_registry_is_added(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    image = build_image(tmp_path / "n", "docker.io/library/later:1", layers=1, layer_size=1024)
    async with node_following(tmp_path, containerd_daemon, containerd_namespace, None) as (
        disco,
        registries,
        runtime,
    ):
        assert runtime.tracker is None
        await import_image(containerd_daemon, containerd_namespace, image)
        write_atomic(registries, DOCKER_HUB_ONLY)
        await wait_keys(disco, keys_of(image), within=FOLLOWS_WITHIN_S)
        # Its hosts.toml is written as well.
        assert (tmp_path / "certs.d" / "docker.io" / "hosts.toml").exists()
