"""What a wave of first pulls costs the upstream: its bytes sent (counted by the kernel in the
upstream's own namespace, outside peermirror), its manifest GETs (from its own log), and a
helper that starts CRI pulls on several nodes at the same moment."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.mesh import MeshNode, NetnsHost
from tests.integration.mesh.p2p import PULL_TIMEOUT, cri_pull

COUNTER_COMMENT = "peermirror-test-upstream-bytes"


def count_upstream_bytes(host: NetnsHost, port: int) -> None:
    """An iptables rule with no target in the upstream's namespace: the kernel counts the bytes
    of every TCP segment the registry sends from `port`, whoever asked (the rule goes with the
    namespace)."""
    host.exec(
        [
            "iptables",
            "-w",
            "-I",
            "OUTPUT",
            "-p",
            "tcp",
            "--sport",
            str(port),
            "-m",
            "comment",
            "--comment",
            COUNTER_COMMENT,
        ]
    )


def sent_bytes(host: NetnsHost) -> int:
    """Bytes the upstream registry has sent so far (the counter of `count_upstream_bytes`)."""
    out = host.exec(["iptables", "-w", "-L", "OUTPUT", "-v", "-x", "-n"]).stdout
    for line in out.splitlines():
        if COUNTER_COMMENT in line:
            return int(line.split()[1])
    raise AssertionError(f"no upstream byte counter in {host.label}'s iptables:\n{out}")


def manifest_gets(log: Path, repository: str) -> dict[str, int]:
    """GETs of `repository`'s manifests in a docker-registry JSON log, by reference."""
    counts: dict[str, int] = {}
    prefix = f"/v2/{repository}/manifests/"
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("http.request.method") != "GET":
            continue
        uri = str(record.get("http.request.uri", ""))
        if not uri.startswith(prefix) or "http.response.status" not in record:
            continue
        reference = uri[len(prefix) :].split("?", 1)[0]
        counts[reference] = counts.get(reference, 0) + 1
    return counts


@dataclass
class PullOutcome:
    """One node's pull in a wave."""

    node: str
    seconds: float
    error: str | None


def pull_together(
    nodes: Sequence[MeshNode], ref: str, timeout: float = PULL_TIMEOUT
) -> list[PullOutcome]:
    """CRI PullImage of `ref` on every node, released by one barrier so they start within
    milliseconds of each other; returns each node's outcome (errors are kept, not raised)."""
    barrier = threading.Barrier(len(nodes))
    outcomes: list[PullOutcome | None] = [None] * len(nodes)

    def pull(i: int, node: MeshNode) -> None:
        barrier.wait()
        start = time.monotonic()
        error = None
        try:
            cri_pull(node, ref, timeout=timeout)
        except Exception as exc:  # reported by the caller, with every other node's outcome
            error = f"{type(exc).__name__}: {exc}"
        outcomes[i] = PullOutcome(node.name, time.monotonic() - start, error)

    threads = [threading.Thread(target=pull, args=(i, n)) for i, n in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return [
        o if o is not None else PullOutcome(n.name, timeout, "hung")
        for o, n in zip(outcomes, nodes, strict=True)
    ]
