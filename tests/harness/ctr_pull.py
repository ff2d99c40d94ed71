"""Pulls with `ctr` through hosts.toml against a registry of tests/harness/upstream.py: push a
synthetic image, pull it, and read which hosts ctr moved on from."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.harness.containerd import ContainerdDaemon
from tests.harness.images import build_image
from tests.harness.upstream import DistributionRegistry, push_image

# Where containerd may fall back to in tests: nothing listens there.
DEAD_SERVER = "http://127.0.0.1:9"


def push(
    tmp_path: Path, registry: DistributionRegistry, repo_tag: str, named: str = "docker.io"
) -> str:
    """Build a synthetic image `<named>/<repo_tag>` and push it to `registry` as `repo_tag`;
    returns its digest."""
    image = build_image(tmp_path / "layout", name=f"{named}/{repo_tag}")
    push_image(image, registry)
    return image.target.digest


def ctr_pull(
    daemon: ContainerdDaemon, namespace: str, hosts_dir: Path, ref: str
) -> subprocess.CompletedProcess[str]:
    """`ctr images pull` of `ref` configured by the hosts.toml files under `hosts_dir`."""
    return subprocess.run(
        daemon.ctr_argv(
            ["images", "pull", "--all-platforms", "--hosts-dir", str(hosts_dir), ref], namespace
        ),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def hosts_tried(stderr: str) -> list[str]:
    """The hosts ctr reports moving on from, in order."""
    return re.findall(r'host="?([0-9.:]+)"?', stderr)
