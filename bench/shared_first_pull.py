"""Shared first pulls: upstream bytes and pull time when 3 and 5 nodes pull one new image at once.

Registries in one process on loopback (real Sanic servers, real spools, the real peer relay),
each with its own in-flight coordinator. Two parts are stand-ins until their branches merge:
the fetch lease is one in-memory table the nodes share (discovery's lease service), and the
upstream client is the plain-HTTP client of tests/harness/slow_upstream.py. Discovery is the
fake LocalDiscovery that names a node as soon as it advertised.

The upstream is a loopback HTTP server whose connections share one link of ``--rate-mib``
MiB/s, and it counts the body bytes it sent. Each node's "client" pulls every layer of the
image at once through its own registry and checks the digests. Baseline, same run: one client
pulling the same image straight from the upstream. Printed per node count: upstream bytes /
image bytes (target <= 1.05) and median pull time / baseline (target <= 1.25), PASS or MISS.

All nodes share one Python process here, so the link rate is kept below what one process can
relay to every node at once (past about 40 MiB/s on a two-core machine the time ratio measures
the shared interpreter, not the design).

Run: `.venv/bin/python -m bench.shared_first_pull` (about half a minute; `--nodes 3` for less).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.harness.inflight_cluster import inflight_cluster
from tests.harness.slow_upstream import SlowUpstream, serve_slow_upstream

MiB = 1 << 20
NS = "upstream.test"
REPO = "library/bench"
BYTES_TARGET = 1.05
TIME_TARGET = 1.25
TIMEOUT = aiohttp.ClientTimeout(total=600)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _pull(session: aiohttp.ClientSession, base: str, layers: dict[str, bytes]) -> float:
    """Seconds to fetch every layer from `base` at once; raises when a digest is wrong."""

    async def one(digest: str) -> None:
        async with session.get(f"{base}/v2/{REPO}/blobs/{digest}?ns={NS}") as response:
            body = await response.read()
        if response.status != 200 or _digest(body) != digest:
            raise RuntimeError(f"{base}: {digest} came back {response.status}, wrong or short")

    started = time.perf_counter()
    await asyncio.gather(*(one(d) for d in layers))
    return time.perf_counter() - started


async def _baseline(layers: dict[str, bytes], rate: float) -> float:
    async with (
        serve_slow_upstream(SlowUpstream(blobs=dict(layers), rate=rate)) as upstream,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        upstream.gate.set()
        return await _pull(session, f"http://127.0.0.1:{upstream.port}", layers)


async def _wave(layers: dict[str, bytes], rate: float, nodes: int) -> tuple[int, list[float]]:
    """(upstream body bytes, each node's pull seconds) for `nodes` pulling at once."""
    with tempfile.TemporaryDirectory(prefix="pm-bench-") as tmp:
        async with (
            serve_slow_upstream(SlowUpstream(blobs=dict(layers), rate=rate)) as upstream,
            inflight_cluster(Path(tmp), nodes, upstream.port) as cluster,
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
        ):
            upstream.gate.set()
            times = await asyncio.gather(
                *(_pull(session, node.registry.url, layers) for node in cluster)
            )
            return upstream.bytes_sent, list(times)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def main_async(args: argparse.Namespace) -> int:
    layers = {}
    for _ in range(args.layers):
        data = os.urandom(args.layer_mib * MiB)
        layers[_digest(data)] = data
    image = sum(len(v) for v in layers.values())
    rate = args.rate_mib * MiB
    baseline = await _baseline(layers, rate)
    print(
        f"image {args.layers} layers x {args.layer_mib} MiB, upstream link {args.rate_mib} MiB/s; "
        f"baseline (one client straight from upstream): {baseline:.2f} s"
    )
    missed = False
    for nodes in args.nodes:
        sent, times = await _wave(layers, rate, nodes)
        bytes_ratio = sent / image
        time_ratio = statistics.median(times) / baseline
        bytes_ok, time_ok = bytes_ratio <= BYTES_TARGET, time_ratio <= TIME_TARGET
        missed |= not (bytes_ok and time_ok)
        print(
            f"{nodes} nodes: upstream bytes {bytes_ratio:.3f}x image "
            f"(target <= {BYTES_TARGET}) {_verdict(bytes_ok)}; "
            f"median pull {statistics.median(times):.2f} s = {time_ratio:.2f}x baseline "
            f"(target <= {TIME_TARGET}) {_verdict(time_ok)}; "
            f"slowest {max(times):.2f} s"
        )
    return 1 if missed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--layer-mib", type=int, default=8)
    parser.add_argument("--rate-mib", type=float, default=10.0)
    parser.add_argument("--nodes", type=lambda s: [int(n) for n in s.split(",")], default=[3, 5])
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
