"""A wave of first pulls: CRI pulls started on several nodes at the same moment."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tests.harness.mesh import MeshNode
from tests.integration.mesh.p2p import PULL_TIMEOUT, cri_pull


@dataclass
class PullOutcome:
    """One node's pull in a wave."""

    node: str
    seconds: float
    error: str | None


def pull_together(
    nodes: Sequence[MeshNode],
    ref: str,
    timeout: float = PULL_TIMEOUT,
    creds: tuple[str, str] | None = None,
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
            cri_pull(node, ref, timeout=timeout, creds=creds)
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
