"""The relay's one data path on the netns mesh, plain and mutual TLS, against Go's registry.

One run, two meshes of three real nodes (plain HTTP, then mutual TLS; see tests/harness/mesh.py).
Nodes 1 and 2 hold a one-layer image; a client in node 3's namespace GETs the layer
(whole-blob GETs, interleaved, page cache warm, the first of each verified) from:

- relay: node 3's mirror, which relays it from a peer;
- local: node 1 serving it itself (peer header), over the same veth path;
- docker-registry: Debian's Go registry (distribution 2.8) in a namespace of its own serving the
  same blob from its disk, plain or TLS with client certificates (the anchor of the targets).

The client is bench.http_load's socket client, which speaks HTTP/1.1 as containerd does to
every registry. The same GETs are then timed with curl at its defaults, the client the issue's
own figures came from: over TLS curl negotiates HTTP/2 with docker-registry (Go offers it;
peermirror does not), and Go's HTTP/2 serve is far slower than its HTTP/1.1 serve, so the
throughput targets are printed against both anchors, each line saying which.

Also CPU-seconds per GB per process for each path run alone (the socket client), and the floor
of the relaying node: SHA-256 of every byte plus, over TLS, one decryption and one encryption
(both measured by a microbenchmark in this run, on this CPU), that floor plus the socket work
no relay can skip (one receive, one send: see socket_io), and from these the ceiling of any
relay on this machine, where the client, the peer and the relaying node share the same cores (see
relay_ceiling), and likewise the ceiling of any server sending the blob over TLS to the local
path's client (see local_ceiling). Last, on the TLS mesh, node 2's
link is slowed to a hundredth of the clean relay rate (tc tbf on its interface) and the relay
GETs are timed again: whichever provider the relay starts from, the pull must take at most
twice a clean one.

Targets (issue 12): TLS relay >= 1.0x docker-registry TLS; TLS local >= 1.5x docker-registry
TLS; plain relay >= 0.5x docker-registry plain; the relaying node's CPU per GB <= 1.5x its
floor; slow second provider <= 2x a clean pull. Exit 0 whether targets are met or missed (the
PASS/MISS lines say which); 1 only when the benchmark itself could not run.

Run as root: `.venv/bin/python -m bench.relay_paths` (needs containerd and docker-registry).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import ssl
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.distribution_registry import lay_out_storage, registry_argv
from bench.http_load import BlobFetch, LoadError, curl_blob, fetch_blob
from bench.p2p_mesh import MESH_TIMINGS, PEER_HEADER, process_cpu_s
from bench.process_cpu import FLOOR_PASSES, sha256_s_per_gb
from bench.report import median, progress, verdict
from bench.root_run import run_as_root
from services.common.pki import issue_node, write_node
from services.common.tls import TlsFiles, client_context, server_context
from tests.harness.images import BuiltImage, build_image, write_oci_archive
from tests.harness.mesh import Mesh, MeshError, MeshNode, MeshProcess, NetnsHost
from tests.harness.mesh_p2p import wait_advertised
from tests.harness.wait import eventually

MIB = 1 << 20
REGISTRY = "registry.test:5000"
REPOSITORY = "library/relay-bench"
IMAGE_REF = f"{REGISTRY}/{REPOSITORY}:1"
UPSTREAM_PORT = 5000
SETUP_TIMEOUT = 120.0
SLOWDOWN = 100
TARGETS = {
    "tls_relay_vs_registry": 1.0,
    "tls_local_vs_registry": 1.5,
    "plain_relay_vs_registry": 0.5,
    "relay_cpu_vs_floor": 1.5,
    "slow_provider_vs_clean": 2.0,
}


# --- runs inside a namespace ----------------------------------------------------------------------


def worker_main(spec_json: str) -> int:
    """Whole-blob GETs of each target, interleaved: GB/s and seconds per target, the client's
    own CPU seconds and the HTTP version spoken. The client is bench.http_load's socket client,
    or curl with `"client": "curl"`."""
    spec = json.loads(spec_json)
    tls = spec.get("tls")
    context = None
    if tls is not None:
        context = client_context(TlsFiles(Path(tls[0]), Path(tls[1]), Path(tls[2])))
    rates: dict[str, list[float]] = {t["label"]: [] for t in spec["targets"]}
    seconds: dict[str, list[float]] = {t["label"]: [] for t in spec["targets"]}
    cpu: dict[str, float] = dict.fromkeys(rates, 0.0)
    protocols: dict[str, str] = {}

    def get(target: Mapping[str, Any], verify: bool = False) -> BlobFetch:
        if spec.get("client") == "curl" and not verify:
            scheme = "http" if tls is None else "https"
            url = f"{scheme}://{target['host']}:{target['port']}{target['path']}"
            files = None if tls is None else (tls[0], tls[1], tls[2])
            return curl_blob(url, target["headers"], tls_files=files)
        return fetch_blob(
            target["host"],
            target["port"],
            target["path"],
            target["headers"],
            verify=verify,
            tls=context,
            timeout=300.0,
        )

    for target in spec["targets"] if spec["verify"] else ():
        got = get(target, verify=True)
        if got.status != 200 or f"sha256:{got.sha256}" != target["digest"]:
            raise LoadError(f"{target['label']}: answered {got.status}, sha256 {got.sha256}")
    for _ in range(spec["reps"]):
        for target in spec["targets"]:
            started, used = time.perf_counter(), _cpu_s()
            got = get(target)
            seconds[target["label"]].append(time.perf_counter() - started)
            cpu[target["label"]] += _cpu_s() - used
            if got.status != 200 or got.body_bytes != target["size"]:
                raise LoadError(f"{target['label']}: answered {got.status}")
            rates[target["label"]].append(got.gb_per_s)
            protocols[target["label"]] = got.protocol
    answer = {"rates": rates, "seconds": seconds, "client_cpu_s": cpu, "protocols": protocols}
    print(json.dumps(answer))
    return 0


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (curl runs as one)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_worker(host: NetnsHost, spec: Mapping[str, Any]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.relay_paths", "--worker", json.dumps(spec)]
    out = host.exec(argv, timeout=900).stdout
    answer: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return answer


# --- the floor --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsCost:
    """CPU seconds per GB of the TLS cipher work, each direction measured apart."""

    encrypt: float
    decrypt: float

    @property
    def both(self) -> float:
        """One decryption and one encryption: what a relaying node does to every byte."""
        return self.encrypt + self.decrypt


def tls_cost(files: TlsFiles, ip: str) -> TlsCost:
    """CPU seconds per GB to encrypt and to decrypt a stream once with the cluster's TLS setup
    (in memory, so no socket work is counted; each the median of FLOOR_PASSES passes of
    256 MiB)."""
    client_bios = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_bios = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(files).wrap_bio(*client_bios, server_hostname=ip)
    server = server_context(files).wrap_bio(*server_bios, server_side=True)

    def shuttle() -> None:
        server_bios[0].write(client_bios[1].read())
        client_bios[0].write(server_bios[1].read())

    for _ in range(20):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        shuttle()
    data = bytes(MIB)
    total = 256 * MIB

    def one_pass() -> tuple[float, float]:
        encrypting = decrypting = 0.0
        moved = 0
        while moved < total:
            started = time.process_time()
            client.write(data)
            records = client_bios[1].read()
            encrypting += time.process_time() - started
            started = time.process_time()
            server_bios[0].write(records)
            while True:
                try:
                    moved += len(server.read(4 * MIB))
                except ssl.SSLWantReadError:
                    break
            decrypting += time.process_time() - started
        gb = total / 1e9
        return encrypting / gb, decrypting / gb

    passes = [one_pass() for _ in range(FLOOR_PASSES)]
    return TlsCost(encrypt=median([e for e, _ in passes]), decrypt=median([d for _, d in passes]))


# --- the docker-registry anchor ------------------------------------------------------------------


def start_registry(
    mesh: Mesh, image: BuiltImage, layout: Path, tls: bool
) -> tuple[NetnsHost, MeshProcess]:
    """docker-registry in a namespace of its own serving `image` from its disk (TLS with client
    certificates from the mesh CA when `tls`)."""
    host = mesh.add_host("anchor")
    blobs = {d.digest: layout / "blobs" / "sha256" / d.digest.split(":")[1] for d in image.blobs}
    platform = image.platforms[0]
    layers = [platform.config.digest, *(layer.descriptor.digest for layer in platform.layers)]
    lay_out_storage(host.dir / "data", REPOSITORY, "1", image.target.digest, blobs, layers)
    http: dict[str, Any] = {"addr": f"{host.ip}:{UPSTREAM_PORT}", "secret": "peermirror-bench"}
    if tls:
        assert mesh.ca is not None
        files = host.dir / "tls"
        files.mkdir(mode=0o700)
        write_node(files, issue_node(mesh.ca, "anchor", host.ip), mesh.ca.cert)
        found = TlsFiles.in_directory(files)
        http["tls"] = {
            "certificate": str(found.cert_file),
            "key": str(found.key_file),
            "clientcas": [str(found.ca_file)],
        }
    config = {
        "version": 0.1,
        "log": {"level": "warn", "formatter": "json", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(host.dir / "data")},
            "cache": {"blobdescriptor": "inmemory"},
            "delete": {"enabled": False},
        },
        "http": http,
    }
    path = host.dir / "registry.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = host.popen("docker-registry", registry_argv(path))
    dial = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1)"

    def answers() -> bool:
        argv = [sys.executable, "-c", dial, host.ip, str(UPSTREAM_PORT)]
        return host.exec(argv, check=False).returncode == 0

    if not eventually(answers, SETUP_TIMEOUT, interval=0.5):
        raise MeshError("docker-registry did not answer")
    return host, proc


# --- one mesh ---------------------------------------------------------------------------------


def _target(label: str, host: str, port: int, digest: str, size: int, peer: bool) -> dict[str, Any]:
    return {
        "label": label,
        "host": host,
        "port": port,
        "path": f"/v2/{REPOSITORY}/blobs/{digest}?ns={REGISTRY}",
        "headers": dict(PEER_HEADER) if peer else {},
        "digest": digest,
        "size": size,
    }


def measure_mesh(
    tls: bool, image: BuiltImage, layout: Path, archive: Path, reps: int
) -> dict[str, Any]:
    kind = "mTLS" if tls else "plain"
    progress(f"[{kind}] starting the mesh (3 nodes) ...")
    mesh = Mesh(3, overrides=MESH_TIMINGS, tls=tls)
    try:
        mesh.start()
        n1, n2, n3 = mesh.nodes
        for node in (n1, n2):
            node.containerd.import_archive(archive, all_platforms=True)
        anchor, anchor_proc = start_registry(mesh, image, layout, tls)
        wait_advertised([n3], image, [n1, n2])
        layer = image.platforms[0].layers[0].descriptor
        targets = [
            _target("relay", "127.0.0.1", n3.registry_port, layer.digest, layer.size, False),
            _target("local", n1.ip, n1.registry_port, layer.digest, layer.size, True),
            _target("registry", anchor.ip, UPSTREAM_PORT, layer.digest, layer.size, False),
        ]
        creds = (
            None
            if n3.tls is None
            else [str(p) for p in (n3.tls.ca_file, n3.tls.cert_file, n3.tls.key_file)]
        )
        progress(f"[{kind}] throughput, interleaved ...")
        answer = run_worker(n3, {"reps": reps, "targets": targets, "tls": creds, "verify": True})
        rates = {k: median(v) for k, v in answer["rates"].items()}
        clean_s = median(answer["seconds"]["relay"])
        progress(f"[{kind}] " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in rates.items()))
        progress(f"[{kind}] throughput with curl, interleaved ...")
        by_curl = run_worker(
            n3,
            {"reps": reps, "targets": targets, "tls": creds, "verify": False, "client": "curl"},
        )
        curl_rates = {k: median(v) for k, v in by_curl["rates"].items()}
        processes = {
            "n3 registry": n3.services["registry"].pid,
            "n1 registry": n1.services["registry"].pid,
            "n2 registry": n2.services["registry"].pid,
            "docker-registry": anchor_proc.pid,
        }
        cpu: dict[str, dict[str, float]] = {}
        for target in targets:
            before = {name: process_cpu_s(pid) for name, pid in processes.items()}
            alone = run_worker(
                n3, {"reps": reps, "targets": [target], "tls": creds, "verify": False}
            )
            gb = reps * layer.size / 1e9
            used = {
                name: (process_cpu_s(pid) - before[name]) / gb for name, pid in processes.items()
            }
            used["client"] = alone["client_cpu_s"][target["label"]] / gb
            cpu[target["label"]] = {k: v for k, v in used.items() if v > 0.005}
        figures: dict[str, Any] = {
            "rates": rates,
            "cpu": cpu,
            "clean_s": clean_s,
            "curl_rates": curl_rates,
            "curl_protocols": by_curl["protocols"],
        }
        if tls:
            assert n1.tls is not None
            figures["tls"] = tls_cost(n1.tls, n1.ip)
            figures["slow"] = slow_provider(n2, n3, targets[0], creds, rates["relay"], reps)
        return figures
    finally:
        mesh.close()


def slow_provider(
    slow: MeshNode,
    client: MeshNode,
    relay: dict[str, Any],
    creds: Any,
    clean_gbps: float,
    reps: int,
) -> list[float]:
    """Relay GET seconds with `slow`'s link cut to a SLOWDOWN-th of the clean relay rate."""
    rate_bit = max(8_000, int(clean_gbps * 1e9 * 8 / SLOWDOWN))
    progress(f"[mTLS] slowing node 2's link to {rate_bit / 8e6:.1f} MB/s ...")
    slow.limit_egress(rate_bit / 1e6, burst=256 * 1024, latency_ms=400)
    try:
        answer = run_worker(
            client, {"reps": reps, "targets": [relay], "tls": creds, "verify": False}
        )
    except MeshError as exc:
        # What the relaying registry made of it is the interesting part.
        tail = "\n".join(client.log_text("registry").splitlines()[-15:])
        raise MeshError(f"{exc}\nnode 3's registry log:\n{tail}") from exc
    finally:
        slow.unlimit_egress()
    seconds: list[float] = answer["seconds"]["relay"]
    return seconds


# --- report -----------------------------------------------------------------------------------


# The throughput targets, judged once per client: (line, mesh, path over docker-registry, key).
THROUGHPUT = (
    ("mTLS relay / docker-registry TLS", "mTLS", "relay", "tls_relay_vs_registry"),
    ("mTLS local / docker-registry TLS", "mTLS", "local", "tls_local_vs_registry"),
    ("plain relay / docker-registry plain", "plain", "relay", "plain_relay_vs_registry"),
)
PATHS = ("relay", "local", "registry")
# The processes that serve a blob straight to the client on the local and anchor paths.
SERVERS = {"local": "n1 registry", "registry": "docker-registry"}


def relay_ceiling(cpu: Mapping[str, Mapping[str, float]], node_floor: float, cores: int) -> float:
    """The fastest any relay could move a blob on `cores` shared cores, in GB/s.

    Every process of the relay chain shares these cores, so the chain moves at most
    cores / (CPU-s per GB of the whole chain). Whatever the relay's design, the chain holds the
    client (as measured on the relay path), a peer serving the blob (at least as cheap as the
    cheaper of node 1 serving it itself and docker-registry serving it, both measured here) and
    the relaying node doing no more than its floor (SHA-256, over TLS one decryption and one
    encryption). An upper bound: it counts none of the relaying node's own network I/O."""
    serve = min(cpu[path].get(process, 0.0) for path, process in SERVERS.items())
    chain = cpu["relay"].get("client", 0.0) + serve + node_floor
    return cores / chain


def local_ceiling(
    cpu: Mapping[str, Mapping[str, float]], encrypt: float, plain_serve: float, cores: int
) -> float:
    """The fastest any server could send a blob over TLS to the local path's client on `cores`
    shared cores, in GB/s, as relay_ceiling is for a relay.

    The chain is the client (as measured on the local path) and a server doing no more than one
    encryption of every byte plus what serving it without TLS costs (`plain_serve`: node 1's
    plain local serve, measured, which reads the file and sends it with sendfile, so no dearer
    than any send a TLS server makes). An upper bound: the server's copy of each byte into the
    cipher's buffers is not counted."""
    return cores / (cpu["local"].get("client", 0.0) + encrypt + plain_serve)


def socket_io(plain_cpu: Mapping[str, Mapping[str, float]]) -> float:
    """CPU-s per GB of the socket work a relaying node cannot avoid, on top of its floor: it
    receives every byte (as the client on the plain relay path does, measured) and sends it (as
    the peers serving that path do, measured: with sendfile, so no cheaper than a relay's send
    from memory). Taken from the plain mesh, where neither side also does TLS."""
    relay = plain_cpu["relay"]
    serving = sum(v for k, v in relay.items() if k in ("n1 registry", "n2 registry"))
    return relay.get("client", 0.0) + serving


def render(plain: dict[str, Any], mtls: dict[str, Any], sha256: float) -> str:
    meshes = {"plain": plain, "mTLS": mtls}

    def rate_rows(rates: str) -> list[str]:
        return [
            f"{_name(path):<28}{plain[rates][path]:>12.2f}{mtls[rates][path]:>12.2f}"
            for path in PATHS
        ]

    def throughput(rates: str, suffix: str) -> list[tuple[str, float, str, bool]]:
        return [
            (
                f"{line}{suffix}",
                meshes[mesh][rates][path] / meshes[mesh][rates]["registry"],
                key,
                True,
            )
            for line, mesh, path, key in THROUGHPUT
        ]

    lines = ["relay vs local vs docker-registry, one GB = 1e9 bytes"]
    lines.append(f"{'path':<28}{'plain GB/s':>12}{'mTLS GB/s':>12}")
    lines += rate_rows("rates")
    lines.append(
        "the same GETs with curl (the issue's own method; over TLS curl speaks "
        + ", ".join(f"{_name(k)} {v}" for k, v in mtls["curl_protocols"].items())
        + "):"
    )
    lines += rate_rows("curl_rates")
    lines.append("CPU-s per GB by process (each path alone, the socket client):")
    for kind, figures in meshes.items():
        for label, used in figures["cpu"].items():
            parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(used.items()))
            lines.append(f"  {kind:<6}{label:<10}{parts}")
    tls: TlsCost = mtls["tls"]
    floor_plain = sha256
    floor_tls = sha256 + tls.both  # one decryption (from the peer), one encryption
    lines.append(
        f"floor of the relaying node: SHA-256 {sha256:.2f} CPU-s/GB; TLS encrypt "
        f"{tls.encrypt:.2f} + decrypt {tls.decrypt:.2f}; so plain {floor_plain:.2f}, "
        f"mTLS {floor_tls:.2f}"
    )
    io = socket_io(plain["cpu"])
    cap = TARGETS["relay_cpu_vs_floor"]
    for kind, floor in (("plain", floor_plain), ("mTLS", floor_tls)):
        # What the CPU target leaves beside the floor, against what the sockets alone take.
        reach = "out of reach of any relay" if floor + io > cap * floor else "within reach"
        lines.append(
            f"{kind} floor plus its socket I/O ({io:.2f}): {floor + io:.2f} CPU-s/GB = "
            f"{(floor + io) / floor:.2f}x the floor; the target ({cap:.1f}x) is {reach}"
        )
    cores = os.cpu_count() or 1
    for kind, figures, floor in (("plain", plain, floor_plain), ("mTLS", mtls, floor_tls)):
        ceiling = relay_ceiling(figures["cpu"], floor, cores)
        lines.append(
            f"ceiling of any relay, {kind}, all processes on {cores} cores: {ceiling:.2f} GB/s"
            f" = {ceiling / figures['rates']['registry']:.2f}x docker-registry"
            f" ({ceiling / figures['curl_rates']['registry']:.2f}x with curl)"
        )
    plain_serve = plain["cpu"]["local"].get("n1 registry", 0.0)
    local = local_ceiling(mtls["cpu"], tls.encrypt, plain_serve, cores)
    lines.append(
        f"ceiling of any local serve, mTLS (its client, one encryption, the plain serve "
        f"{plain_serve:.2f}): {local:.2f} GB/s = {local / mtls['rates']['registry']:.2f}x "
        f"docker-registry ({local / mtls['curl_rates']['registry']:.2f}x with curl)"
    )
    slow = mtls["slow"]
    lines.append(
        f"slow second provider: relay GET {', '.join(f'{s:.2f}' for s in slow)} s vs clean "
        f"{mtls['clean_s']:.2f} s"
    )
    checks = [
        *throughput("rates", ""),
        (
            "relaying node CPU / floor, plain",
            plain["cpu"]["relay"].get("n3 registry", 0.0) / floor_plain,
            "relay_cpu_vs_floor",
            False,
        ),
        (
            "relaying node CPU / floor, mTLS",
            mtls["cpu"]["relay"].get("n3 registry", 0.0) / floor_tls,
            "relay_cpu_vs_floor",
            False,
        ),
        (
            "slowest GET with a slow provider / clean",
            max(slow) / mtls["clean_s"],
            "slow_provider_vs_clean",
            False,
        ),
        # The throughput targets once more against the anchor as the issue measured it (curl).
        *throughput("curl_rates", " (curl)"),
    ]
    for name, ratio, key, at_least in checks:
        target = TARGETS[key]
        ok = ratio >= target if at_least else ratio <= target
        sign = ">=" if at_least else "<="
        lines.append(f"{verdict(ok)} {name}: {ratio:.2f}x (target {sign} {target:.1f}x)")
    return "\n".join(lines)


def _name(label: str) -> str:
    return {"registry": "docker-registry"}.get(label, label)


def run(layer_mib: int, reps: int) -> str:
    with tempfile.TemporaryDirectory(prefix="pm-bench-relay-") as tmp:
        work = Path(tmp)
        progress(f"building a one-layer {layer_mib} MiB image ...")
        layout = work / "layout"
        image = build_image(
            layout,
            IMAGE_REF,
            layers=1,
            layer_size=layer_mib * MIB,
            cheap_data=True,
            compresslevel=0,
        )
        archive = work / "image.tar"
        write_oci_archive(archive, [image])
        sha256 = sha256_s_per_gb()
        plain = measure_mesh(False, image, layout, archive, reps)
        mtls = measure_mesh(True, image, layout, archive, reps)
        return render(plain, mtls, sha256)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.relay_paths",
        description="The relay, plain and mutual TLS, against local serving and docker-registry.",
    )
    parser.add_argument("--layer-mib", type=int, default=256, help="size of the blob")
    parser.add_argument("--reps", type=int, default=3, help="timed GETs per path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    return run_as_root(lambda: run(args.layer_mib, args.reps))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
