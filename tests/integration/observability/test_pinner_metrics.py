"""Air-gap imports and pins in the pinner's metrics, against a real containerd."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from services.pinner.airgap import AirgapManager
from services.pinner.metrics import PinnerMetrics
from services.pinner.pins import PinManager
from tests.harness.containerd import ContainerdDaemon
from tests.harness.metrics_scrape import Samples
from tests.integration.pinner_import.helpers import manager, oci_archive

pytestmark = pytest.mark.containerd


@dataclass
class RuntimeStandIn:
    """The parts of a pinner runtime the metrics read (no tracker: nothing advertised)."""

    airgap: AirgapManager
    tracker: None = None

    @property
    def pins(self) -> PinManager:
        return self.airgap.pins


async def test_imports_by_result_and_pinned_images(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    oci_archive(tmp_path, images_dir, "registry.example.test/metrics:1", ".tar")
    (images_dir / "broken.tar").write_bytes(b"not a tar archive at all" * 64)
    async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
        metrics = PinnerMetrics(RuntimeStandIn(airgap))
        before = Samples.parse(metrics.render().decode())
        assert before.value("peermirror_pinned_images") == 0
        await airgap.start()
        await metrics.refresh()
        samples = Samples.parse(metrics.render().decode())
        pinned = len(await airgap.pins.pinned())
    assert samples.value("peermirror_imports_total", result="imported") == 1
    assert samples.value("peermirror_imports_total", result="failed") == 1
    assert samples.value("peermirror_import_duration_seconds_count", result="imported") == 1
    assert samples.value("peermirror_import_duration_seconds_count", result="failed") == 1
    assert pinned > 0
    assert samples.value("peermirror_pinned_images") == pinned
    assert samples.value("peermirror_advertised_keys") == 0
    assert samples.value("peermirror_build_info", service="pinner") == 1
