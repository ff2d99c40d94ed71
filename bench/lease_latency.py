"""What a fetch lease adds to a first pull's miss: lease calls on a 20-node loopback mesh.

Twenty DiscoveryServices run in this process (real gRPC, lookup cache off). On a miss the
registry has already paid one provider lookup that found nobody; it then asks for the lease.
Measured through the LocalDiscovery gRPC API, p50/p99 over many calls, in the same run:

- baseline: FindProviders of a key nobody provides, whole stream (the miss itself);
- AcquireLease of a fresh key (granted: a node lookup, then one call to the closest node);
- AcquireLease of a key another node holds (told the holder: what every waiter pays);
- the same waiter asking again (one call to the node that answered, no lookup);
- RenewLease by the holder (one call to the node that granted it, no lookup);
- ReleaseLease by the holder.

Target: AcquireLease (granted and waiter) p50 at most 2x the baseline's p50: the lease at
most doubles the lookup a miss already costs. Ratios, not milliseconds, are the verdict: the
machine may be shared, and every node runs on one event loop here.

Run: `.venv/bin/python -m bench.lease_latency` (about 20 s). Exit code 1 on a MISS.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench.dht_latency import Figure, figure, timed
from bench.report import verdict
from services.common.genproto.peermirror.discovery.v1 import local_pb2 as lpb
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as lpb_grpc
from services.common.logsetup import configure_logging
from services.discovery.kademlia import dht_key
from tests.harness.discovery_mesh import Mesh

TARGET_RATIO = 2.0


async def measure(nodes: int, rounds: int, seed: int) -> list[Figure]:
    """Builds the mesh and measures every figure."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="lease-latency-") as tmp:
        mesh = Mesh(Path(tmp), discovery={"lookup_cache_ttl": 0.0})
        channels: list[grpc.aio.Channel] = []
        try:
            await mesh.grow(nodes)
            channels = [grpc.aio.insecure_channel(n.local_address) for n in mesh.nodes]
            stubs = [lpb_grpc.LocalDiscoveryStub(c) for c in channels]
            for stub in stubs:  # connect every channel before timing
                await stub.Stats(lpb.StatsRequest(), timeout=5.0)
            miss: list[float] = []
            granted: list[float] = []
            waiter: list[float] = []
            again: list[float] = []
            renew: list[float] = []
            release: list[float] = []
            for i in range(rounds):
                name = f"sha256:{dht_key(f'lease-bench-{seed}-{i}').hex()}"
                holder, other = rng.sample(stubs, 2)

                async def lookup(stub: lpb_grpc.LocalDiscoveryAsyncStub = holder) -> None:
                    request = lpb.FindProvidersRequest(key=name)  # noqa: B023
                    async for _reply in stub.FindProviders(request, timeout=5.0):
                        raise RuntimeError("nobody provides the bench keys")

                miss.append(await timed(lookup))
                acquire = lpb.AcquireLeaseRequest(key=name)
                granted.append(await timed(lambda: holder.AcquireLease(acquire, timeout=5.0)))  # noqa: B023
                waiter.append(await timed(lambda: other.AcquireLease(acquire, timeout=5.0)))  # noqa: B023
                again.append(await timed(lambda: other.AcquireLease(acquire, timeout=5.0)))  # noqa: B023
                renewal = lpb.RenewLeaseRequest(key=name)
                renew.append(await timed(lambda: holder.RenewLease(renewal, timeout=5.0)))  # noqa: B023
                done = lpb.ReleaseLeaseRequest(key=name)
                release.append(await timed(lambda: holder.ReleaseLease(done, timeout=5.0)))  # noqa: B023
            granted_total = sum(n.leases.table.counters.granted for n in mesh.nodes)
            if granted_total != rounds:
                raise RuntimeError(f"{granted_total} leases granted for {rounds} keys")
        finally:
            for channel in channels:
                await channel.close()
            await mesh.close()
    return [
        figure("FindProviders, nobody (baseline)", miss),
        figure("AcquireLease, granted", granted),
        figure("AcquireLease, told the holder", waiter),
        figure("AcquireLease, waiter asks again", again),
        figure("RenewLease", renew),
        figure("ReleaseLease", release),
    ]


def render(figures: list[Figure], nodes: int) -> tuple[str, bool]:
    """The result table with ratios to the baseline's p50, and whether the targets hold."""
    base = figures[0].p50
    lines = [
        f"Fetch lease latency on a {nodes}-node loopback mesh (real gRPC, one process)",
        f"{'call':<34} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'p50 x base':>11} "
        f"{'p99 x base':>11}  target",
    ]
    ok = True
    for index, f in enumerate(figures):
        judged = ""
        if index in (1, 2):
            hit = f.p50 / base <= TARGET_RATIO
            ok = ok and hit
            judged = f"{verdict(hit)} (p50 <= {TARGET_RATIO:g}x base)"
        lines.append(
            f"{f.name:<34} {f.samples:>5} {f.p50:>8.3f} {f.p99:>8.3f} {f.p50 / base:>11.2f} "
            f"{f.p99 / figures[0].p99:>11.2f}  {judged}"
        )
    return "\n".join(lines), ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    configure_logging("bench", fmt="console", level="warning")
    figures = asyncio.run(measure(args.nodes, args.rounds, args.seed))
    text, ok = render(figures, args.nodes)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
