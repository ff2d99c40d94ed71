"""The pinner's Prometheus metrics: advertised keys and images, pinned images, air-gap imports.

Advertised keys carry Spegel's labels (``spegel_advertised_keys{registry}``) plus the key kind;
a digest counts once for each registry an image holding it comes from. They are read from the
tracker's key index at scrape time. Pinned images need a containerd call, made by the scrape's
refresh; imports are counted as they finish.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Counter as CounterMetric
from prometheus_client import Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.containerd.errors import ContainerdError
from services.common.metrics import PREFIX, key_labels, new_registry, registry_of_image, render

if TYPE_CHECKING:
    from services.pinner.airgap.manager import AirgapManager
    from services.pinner.keys import KeyIndex
    from services.pinner.pins import PinManager

# Imports range from a small archive (a second) to multi-GiB air-gap bundles (minutes).
IMPORT_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def advertised_counts(
    images: dict[str, frozenset[str]],
) -> tuple[Counter[tuple[str, str]], Counter[str]]:
    """Per (registry, kind) the distinct keys, per registry the images, of an index's images."""
    keys: set[tuple[str, str]] = set()
    image_counts: Counter[str] = Counter()
    for name, held in images.items():
        if not held:
            continue
        registry = registry_of_image(name)
        image_counts[registry] += 1
        keys.update((registry, key) for key in held)
    key_counts: Counter[tuple[str, str]] = Counter(
        (registry, key_labels(key)[1]) for registry, key in keys
    )
    return key_counts, image_counts


class _Tracking(Protocol):
    @property
    def index(self) -> KeyIndex: ...


class RuntimeView(Protocol):
    """What the metrics read of the pinner runtime (PinnerRuntime has it)."""

    @property
    def tracker(self) -> _Tracking | None: ...

    @property
    def airgap(self) -> AirgapManager | None: ...

    @property
    def pins(self) -> PinManager | None: ...


class _TrackerCollector(Collector):
    def __init__(self, runtime: RuntimeView) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        tracker = self._runtime.tracker
        images = dict(tracker.index.images) if tracker is not None else {}
        key_counts, image_counts = advertised_counts(images)
        keys = GaugeMetricFamily(
            f"{PREFIX}_advertised_keys",
            "Keys this node advertises, by registry and kind (digest or tag)",
            labels=["registry", "kind"],
        )
        for (registry, kind), n in sorted(key_counts.items()):
            keys.add_metric([registry, kind], n)
        yield keys
        advertised_images = GaugeMetricFamily(
            f"{PREFIX}_advertised_images",
            "Images whose content this node advertises, by registry",
            labels=["registry"],
        )
        for registry, n in sorted(image_counts.items()):
            advertised_images.add_metric([registry], n)
        yield advertised_images


class PinnerMetrics:
    """The metrics of one pinner runtime, in its own CollectorRegistry."""

    def __init__(self, runtime: RuntimeView) -> None:
        self._runtime = runtime
        self.registry = new_registry("pinner")
        self.imports = CounterMetric(
            f"{PREFIX}_imports",
            "Air-gap image files imported, by result (imported or failed)",
            ["result"],
            registry=self.registry,
        )
        self.import_duration = Histogram(
            f"{PREFIX}_import_duration_seconds",
            "Seconds one air-gap image file took to import and pin, by result",
            ["result"],
            buckets=IMPORT_BUCKETS,
            registry=self.registry,
        )
        self.pinned = Gauge(
            f"{PREFIX}_pinned_images",
            "Images pinned in containerd (kept from garbage collection)",
            registry=self.registry,
        )
        self.registry.register(_TrackerCollector(runtime))
        if runtime.airgap is not None:
            runtime.airgap.on_import = self.import_done

    def import_done(self, result: str, seconds: float) -> None:
        self.imports.labels(result=result).inc()
        self.import_duration.labels(result=result).observe(seconds)

    async def refresh(self) -> None:
        """Read what needs containerd: the pinned images (left as they were when it is down)."""
        pins = self._runtime.pins
        if pins is None:
            return
        with contextlib.suppress(ContainerdError):
            self.pinned.set(len(await pins.pinned()))

    def render(self) -> bytes:
        return render(self.registry)
