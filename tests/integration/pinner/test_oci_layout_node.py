"""The pinner on the oci-layout store (no containerd): a real OCI layout directory is tracked and
what it holds is advertised, changes are followed, the air-gap importer stays off. Discovery is
the in-memory fake on a loopback port."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.common.config import NodeConfig, load_config
from services.common.store.oci_layout import OciLayoutStore
from services.pinner.tracker import Tracker
from tests.harness.fake_discovery import FakeDiscovery
from tests.harness.images import BuiltImage, build_image
from tests.integration.pinner.runtime import keys_of, pinner, wait_keys

# Only there so a bug fails instead of hangs (the store is polled every 0.5 s).
MIRROR_DOCKER_IO = "mirrors:\n  docker.io: {}\n"


def node_config(
    tmp_path: Path, discovery_address: str, registries_yaml: str = MIRROR_DOCKER_IO
) -> NodeConfig:
    registries_file = tmp_path / "registries.yaml"
    registries_file.write_text(registries_yaml)
    base = load_config(None, {})
    return dataclasses.replace(
        base,
        registry=dataclasses.replace(base.registry, registries_file=registries_file),
        discovery=dataclasses.replace(base.discovery, local_address=discovery_address),
        pinner=dataclasses.replace(
            base.pinner,
            certs_dir=tmp_path / "certs.d",
            images_dir=tmp_path / "images",
            grpc_address="127.0.0.1:0",
            write_hosts=False,
        ),
        store=dataclasses.replace(
            base.store,
            backend="oci-layout",
            oci_layout_path=tmp_path / "layout",
            # Nothing listens here: the oci-layout node must never need containerd.
            containerd_address=str(tmp_path / "no-containerd.sock"),
        ),
    )


def seed(layout: Path, name: str) -> BuiltImage:
    return build_image(layout, name, layers=2, layer_size=4096)


async def test_layout_images_are_advertised_and_changes_followed(tmp_path: Path) -> None:
    async with FakeDiscovery() as disco:
        cfg = node_config(tmp_path, disco.address)
        layout = cfg.store.oci_layout_path
        first = seed(layout, "docker.io/library/first:1")
        async with pinner(cfg) as runtime:
            assert isinstance(runtime.tracker, Tracker)
            await wait_keys(disco, keys_of(first))
            state = runtime.sync_state()
            assert state.participating
            assert state.advertised_keys == len(keys_of(first))

            # A new image appears in the layout.
            second = seed(layout, "docker.io/library/second:2")
            await wait_keys(disco, keys_of(first) | keys_of(second))

            # The first image is deleted (its blobs pruned): everything of it is withdrawn.
            store = OciLayoutStore(layout)
            store.remove_image(first.name)
            await wait_keys(disco, keys_of(second))


async def test_a_second_name_keeps_shared_digests_advertised(tmp_path: Path) -> None:
    async with FakeDiscovery() as disco:
        cfg = node_config(tmp_path, disco.address)
        layout = cfg.store.oci_layout_path
        image = seed(layout, "docker.io/library/app:1")
        store = OciLayoutStore(layout)
        alias = "docker.io/library/app:stable"
        async with pinner(cfg):
            await wait_keys(disco, keys_of(image))
            store.set_image(alias, image.target)
            await wait_keys(disco, keys_of(image) | {alias})
            # The original name goes; the alias still reaches every blob, so nothing is pruned
            # and only the tag key is withdrawn.
            assert store.remove_image(image.name) == []
            await wait_keys(disco, keys_of(image, tag=False) | {alias})


async def test_a_blob_removed_from_disk_is_withdrawn(tmp_path: Path) -> None:
    async with FakeDiscovery() as disco:
        cfg = node_config(tmp_path, disco.address)
        image = seed(cfg.store.oci_layout_path, "docker.io/library/lossy:1")
        async with pinner(cfg):
            await wait_keys(disco, keys_of(image))
            layer = image.platforms[0].layers[1].descriptor.digest
            image.blob_path(layer).unlink()
            await wait_keys(disco, keys_of(image) - {layer})


async def test_serving_rules_decide_what_is_advertised(tmp_path: Path) -> None:
    async with FakeDiscovery() as disco:
        cfg = node_config(tmp_path, disco.address)
        layout = cfg.store.oci_layout_path
        mirrored = seed(layout, "docker.io/library/kept:1")
        latest = seed(layout, "docker.io/library/moving:latest")
        seed(layout, "quay.io/other/not-mirrored:1")
        async with pinner(cfg):
            # Not mirrored: nothing; `latest`: its digests but not the tag.
            await wait_keys(disco, keys_of(mirrored) | keys_of(latest, tag=False))


async def test_a_node_mirroring_nothing_takes_no_part(tmp_path: Path) -> None:
    async with FakeDiscovery() as disco:
        cfg = node_config(tmp_path, disco.address, registries_yaml="mirrors: {}\n")
        seed(cfg.store.oci_layout_path, "docker.io/library/quiet:1")
        async with pinner(cfg) as runtime:
            assert runtime.tracker is None
            assert not runtime.sync_state().participating
        assert disco.keys == set()


async def test_no_airgap_import_and_no_containerd_needed(tmp_path: Path) -> None:
    async with FakeDiscovery() as disco:
        cfg = node_config(tmp_path, disco.address)
        image = seed(cfg.store.oci_layout_path, "docker.io/library/solo:1")
        async with pinner(cfg, airgap=True) as runtime:
            assert runtime.airgap is None
            assert runtime.client is None
            await wait_keys(disco, keys_of(image))
            assert runtime.running
