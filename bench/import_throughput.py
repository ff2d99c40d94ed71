"""Air-gap import throughput: our streaming importer against `ctr images import`, same run.

Builds one synthetic image of about 1 GiB (single platform, incompressible layers), writes it as
an OCI archive (plain tar) and as a zstd-compressed copy, then imports into fresh namespaces of
one throw-away containerd:

  baseline  `ctr images import --all-platforms --no-unpack` of the plain tar (ctr cannot read
            zstd archives, so the plain tar is its best case);
  ours      the pinner's importer on the .tar.zst (what a K3s node gets) and on the same plain
            tar (the like-for-like comparison).

Throughput is the uncompressed archive size over wall time. The ratio against the baseline is
printed for both; the target is >= 0.8x for the .tar.zst import.
Run: `.venv/bin/python -m bench.import_throughput [--size-mib 1024] [--repeat 1]`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from services.common.containerd.client import ContainerdClient
from services.pinner.airgap.formats import FileKind
from services.pinner.airgap.importer import ArchiveImporter
from services.pinner.airgap.ingest import IngestChannel
from services.pinner.pins import managed_labels
from tests.harness.containerd import ContainerdDaemon
from tests.harness.images import build_image

MIB = 1024 * 1024
TARGET_RATIO = 0.8
IMAGE = "registry.example.test/bench/big:1"


def build_archives(work: Path, size_mib: int) -> tuple[Path, Path]:
    """The plain OCI archive and its zstd copy (level 1 streaming, default 8 MiB window)."""
    layers = 4
    image = build_image(
        work / "layout",
        name=IMAGE,
        layers=layers,
        layer_size=size_mib * MIB // layers,
        cheap_data=True,
        compresslevel=0,
    )
    tar = image.write_oci_archive(work / "image.tar")
    shutil.rmtree(work / "layout")
    zst = work / "image.tar.zst"
    zstd = shutil.which("zstd")
    if zstd is None:
        sys.exit("needs the Debian package `zstd`")
    subprocess.run([zstd, "-q", "-1", "-T0", "-f", str(tar), "-o", str(zst)], check=True)
    return tar, zst


def time_ctr(daemon: ContainerdDaemon, tar: Path, namespace: str) -> float:
    start = time.perf_counter()
    daemon.import_archive(tar, namespace, all_platforms=True, unpack=False)
    return time.perf_counter() - start


async def time_ours(daemon: ContainerdDaemon, path: Path, kind: FileKind, namespace: str) -> float:
    client = ContainerdClient(daemon.address, namespace)
    ingest = IngestChannel(daemon.address, namespace)
    try:
        importer = ArchiveImporter(client, ingest)
        start = time.perf_counter()
        names = await importer.import_archive(path, kind, managed_labels(str(path)))
        elapsed = time.perf_counter() - start
        assert IMAGE in names, names
        return elapsed
    finally:
        await ingest.close()
        await client.close()


def drop_caches_hint(path: Path) -> None:
    # Read the archive once so every contender starts from the page cache, not the disk.
    with path.open("rb") as f:
        while f.read(8 * MIB):
            pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender (best kept)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="pm-bench-import-") as tmp:
        work = Path(tmp)
        print(f"building a {args.size_mib} MiB image ...", flush=True)
        tar, zst = build_archives(work, args.size_mib)
        size = tar.stat().st_size
        print(f"archive: {size / MIB:.0f} MiB plain tar, {zst.stat().st_size / MIB:.0f} MiB zstd")
        with ContainerdDaemon(base_dir=work / "containerd") as daemon:
            results: dict[str, float] = {}
            contenders = ("ctr import .tar", "ours .tar.zst", "ours .tar")
            for run in range(args.repeat):
                for name in contenders:
                    namespace = f"bench-{run}-{len(results)}-{abs(hash(name)) % 10000}"
                    drop_caches_hint(zst if "zst" in name else tar)
                    if name.startswith("ctr"):
                        elapsed = time_ctr(daemon, tar, namespace)
                    elif "zst" in name:
                        elapsed = asyncio.run(time_ours(daemon, zst, FileKind.ZSTD, namespace))
                    else:
                        elapsed = asyncio.run(time_ours(daemon, tar, FileKind.TAR, namespace))
                    results[name] = min(results.get(name, elapsed), elapsed)
                    daemon.purge_namespace(namespace)
        base = size / MIB / results["ctr import .tar"]
        print(f"\n{'contender':<18} {'seconds':>8} {'MiB/s':>8} {'vs ctr':>7}")
        for name in contenders:
            rate = size / MIB / results[name]
            print(f"{name:<18} {results[name]:>8.2f} {rate:>8.1f} {rate / base:>6.2f}x")
        ratio = (size / MIB / results["ours .tar.zst"]) / base
        verdict = "meets" if ratio >= TARGET_RATIO else "misses"
        print(f"\nours .tar.zst vs ctr .tar: {ratio:.2f}x ({verdict} the {TARGET_RATIO}x target)")
        return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
