"""Cost of one discovery maintenance tick with a full provider store against a nearly empty one.

A tick runs on the discovery event loop every second. It must cost what is due (records that
expire, providers to probe), not a walk over every record held: before the fix a store of 200k
records from one peer made a tick take 0.235 s. Both stores here have the same providers; the
baseline holds a few records each, the loaded one fills discovery.max_records_total. Ticks with
nothing due are timed in both, in the same run; the target is a ratio near 1.

Run: `.venv/bin/python -m bench.discovery_maintenance` (a few seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from bench.report import verdict
from services.discovery.kademlia import Contact, DhtConfig, DhtNode, dht_key
from services.discovery.kademlia.node_id import int_id

# A tick may cost this many times the baseline's and still count as independent of the records.
TARGET_RATIO = 1.5
PROVIDERS = 50


def build(records_per_provider: int, config: DhtConfig) -> DhtNode:
    """A node holding `records_per_provider` records of each of PROVIDERS providers."""
    node = DhtNode(Contact(int_id(1), "10.0.0.1", 5001, 6443), config)
    for p in range(PROVIDERS):
        provider = Contact(int_id(1000 + p), f"10.0.1.{p + 1}", 5001, 6443)
        for i in range(records_per_provider):
            node.store.add(dht_key(f"{p}-{i}"), provider, config.record_ttl, 0.0)
    return node


def tick_seconds(node: DhtNode, ticks: int) -> float:
    """Median seconds of `ticks` maintenance ticks with nothing due (every provider recently
    heard from, no record near expiry)."""
    times: list[float] = []
    for t in range(ticks):
        now = 1.0 + t * 0.001
        for contact in node.store.provider_contacts():
            node.store.heard_from(contact.node_id, now)
        started = time.perf_counter()
        node.maintenance(now)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=200)
    args = parser.parse_args(argv)
    config = DhtConfig()
    full = config.max_records_total // PROVIDERS
    base = build(2, config)
    loaded = build(full, config)
    base_s = tick_seconds(base, args.ticks)
    loaded_s = tick_seconds(loaded, args.ticks)
    ratio = loaded_s / base_s
    met = ratio <= TARGET_RATIO
    print(f"providers: {PROVIDERS}; records: baseline {len(base.store):,}", end="")
    print(f", loaded {len(loaded.store):,}")
    print(f"tick (median of {args.ticks}): baseline {base_s * 1e6:.1f} us", end="")
    print(f", loaded {loaded_s * 1e6:.1f} us")
    print(f"ratio loaded/baseline {ratio:.2f}x (target <= {TARGET_RATIO}x): {verdict(met)}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
