"""Hop counts of DHT provider lookups on simulated networks of 100, 1,000 and 5,000 nodes.

Kademlia promises O(log N) hops. Each network is built the way the service joins (every
node bootstraps through one node), keys are advertised by random nodes, and random other
nodes look them up. The 100-node network is the baseline: growth ratios of the hop
figures are printed next to the log2(N) ratio, so logarithmic growth shows as hop ratios
at or below it.

Run: `.venv/bin/python -m bench.dht_hops` (about two minutes; `--sizes 100,1000` for less).
Exit code 1 when a lookup fails to find a provider.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.percentile import percentile
from services.discovery.kademlia import DhtConfig
from tests.harness.dht_sim import SimNetwork


@dataclass(frozen=True)
class Figures:
    """Lookup results on one network size."""

    nodes: int
    lookups: int
    found: int
    hops_mean: float
    hops_median: float
    hops_p99: int
    hops_max: int
    queries_mean: float
    build_seconds: float


def measure(nodes: int, keys: int, seed: int) -> Figures:
    """Builds a network of `nodes`, advertises `keys` keys, looks each up from a random node."""
    started = time.perf_counter()
    net = SimNetwork(DhtConfig(), seed=seed)
    net.grow(nodes)
    members = list(net.nodes.values())
    owners: dict[str, bytes] = {}
    for i in range(keys):
        name = f"sha256:{i:064x}"
        owner = net.rng.choice(members)
        net.advertise(owner, [name])
        owners[name] = owner.node_id
    built = time.perf_counter() - started
    rng = random.Random(seed + 1)
    hops: list[int] = []
    queries: list[int] = []
    found = 0
    for name, owner_id in owners.items():
        asker = rng.choice(members)
        while asker.node_id == owner_id:
            asker = rng.choice(members)
        answer = net.find_providers(asker, name, limit=1)
        found += any(p.node_id == owner_id for p in answer.providers)
        hops.append(answer.hops)
        queries.append(answer.queries)
    return Figures(
        nodes=nodes,
        lookups=len(owners),
        found=found,
        hops_mean=statistics.fmean(hops),
        hops_median=statistics.median(hops),
        hops_p99=percentile(hops, 0.99),
        hops_max=max(hops),
        queries_mean=statistics.fmean(queries),
        build_seconds=built,
    )


def ratio(value: float, base: float) -> str:
    return f"{value / base:5.2f}x" if base else "  n/a"


def report(results: list[Figures]) -> None:
    base = results[0]
    print(
        f"{'nodes':>6} {'found':>9} {'mean':>5} {'p50':>4} {'p99':>4} {'max':>4} "
        f"{'queries':>7} | {'mean/base':>9} {'p99/base':>8} {'log2N/base':>10} "
        f"{'N/base':>7} {'mean/log2N':>10} | {'build s':>7}"
    )
    for fig in results:
        log_ratio = math.log2(fig.nodes) / math.log2(base.nodes)
        print(
            f"{fig.nodes:>6} {fig.found:>4}/{fig.lookups:<4} {fig.hops_mean:5.2f} "
            f"{fig.hops_median:>4g} {fig.hops_p99:>4} {fig.hops_max:>4} "
            f"{fig.queries_mean:7.1f} | {ratio(fig.hops_mean, base.hops_mean):>9} "
            f"{ratio(fig.hops_p99, base.hops_p99):>8} {log_ratio:9.2f}x "
            f"{fig.nodes / base.nodes:6.0f}x {fig.hops_mean / math.log2(fig.nodes):10.3f} | "
            f"{fig.build_seconds:7.1f}"
        )
    print(
        "hops: length of the query chain up to the first answer naming a provider "
        "(1 = a contact from the asker's own table knew it); queries: RPCs per lookup.\n"
        "Logarithmic growth: hop ratios track log2N/base, far below N/base, and "
        "mean/log2N stays flat."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,5000", help="comma-separated node counts")
    parser.add_argument("--keys", type=int, default=300, help="keys advertised per network")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results: list[Figures] = []
    for nodes in sizes:
        results.append(measure(nodes, args.keys, args.seed))
        print(f"measured {nodes} nodes", file=sys.stderr, flush=True)
    report(results)
    return 0 if all(f.found == f.lookups for f in results) else 1


if __name__ == "__main__":
    sys.exit(main())
