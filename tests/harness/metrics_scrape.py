"""Reads a Prometheus text exposition into samples the tests can query by name and labels."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Samples:
    """Every sample of one scrape."""

    rows: tuple[tuple[str, dict[str, str], float], ...]

    @classmethod
    def parse(cls, text: str) -> Samples:
        rows = [
            (sample.name, dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]
        return cls(tuple(rows))

    def value(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (0.0 when none)."""
        return sum(
            value
            for sample, have, value in self.rows
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def names(self) -> set[str]:
        return {name for name, _, _ in self.rows}


async def scrape(session: aiohttp.ClientSession, base_url: str) -> Samples:
    """GET `base_url`/metrics: a 200 in Prometheus' text format, parsed."""
    async with session.get(f"{base_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return Samples.parse(await resp.text())
